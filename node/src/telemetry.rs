//! The node's own metrics and logs. Metric names are part of fluxmesh's
//! interface; README.md lists them.

use crate::ingress::Source;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its
/// handle. Several nodes in one process (tests) share it. `None` if another
/// recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &buckets)
                .map_err(|e| tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "bad histogram buckets"))
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot install the metrics recorder; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("fluxmesh_ingest_messages_total", "Device messages stored in JetStream, by source (mqtt, http).");
    describe_counter!("fluxmesh_ingest_rejected_total", "Device messages refused, by source and reason.");
    describe_counter!(
        "fluxmesh_ingest_failed_total",
        "Device messages accepted but not stored after every retry, by source and reason."
    );
    describe_histogram!(
        "fluxmesh_publish_ack_seconds",
        Unit::Seconds,
        "Time from sending a JetStream publish to its ack."
    );
    describe_histogram!(
        "fluxmesh_ingest_seconds",
        Unit::Seconds,
        "Time from receiving a device message to its JetStream ack."
    );
    describe_counter!("fluxmesh_publish_retries_total", "JetStream publishes sent again after a timeout or refusal.");
    describe_counter!(
        "fluxmesh_publish_duplicates_total",
        "Publishes JetStream recognised as duplicates (same Nats-Msg-Id)."
    );
    describe_gauge!("fluxmesh_publish_in_flight", "JetStream publishes awaiting their ack.");
    describe_gauge!("fluxmesh_nats_connected", "1 while the node is connected to NATS.");
    describe_counter!("fluxmesh_json_mirror_failed_total", "JSON mirror publishes that failed.");
    describe_gauge!("fluxmesh_mqtt_subscriptions", "MQTT subscriptions held by this node's sessions.");
    describe_counter!(
        "fluxmesh_mqtt_feed_messages_total",
        "Stored messages this node read back from the streams for its MQTT subscribers."
    );
    describe_counter!(
        "fluxmesh_mqtt_feed_failures_total",
        "Times a subscriber feed could not read its stream and retried."
    );
    describe_counter!(
        "fluxmesh_mqtt_feed_unreadable_total",
        "Stored messages not delivered to subscribers because their subject or frame could not be read, by reason."
    );
    describe_counter!("fluxmesh_mqtt_deliveries_queued_total", "Messages queued for an MQTT subscriber.");
    describe_counter!("fluxmesh_mqtt_deliveries_total", "Messages written to MQTT subscribers, by QoS.");
    describe_counter!(
        "fluxmesh_mqtt_deliveries_dropped_total",
        "Messages an MQTT subscriber did not get, by reason (retained_over_queue)."
    );
    describe_counter!(
        "fluxmesh_mqtt_deliveries_deferred_total",
        "Messages that did not fit in an MQTT subscriber's queue and are read back from the stream."
    );
    describe_counter!(
        "fluxmesh_mqtt_catch_ups_total",
        "Catch-ups: subscribers reading back from a stream what did not fit in their queue."
    );
    describe_counter!("fluxmesh_mqtt_shared_deliveries_total", "Shared-subscription messages handed to a member.");
    describe_counter!(
        "fluxmesh_mqtt_shared_given_back_total",
        "Shared-subscription messages given back because every member's queue was full."
    );
    describe_counter!("fluxmesh_mqtt_shared_ack_failed_total", "Acks of shared-subscription messages that failed.");
    describe_counter!("fluxmesh_mqtt_ws_handshake_failures_total", "MQTT WebSocket upgrades that failed or timed out.");
    describe_counter!(
        "fluxmesh_mqtt_denied_topics_total",
        "Publishes and subscriptions refused by mqtt.deny_topics, by action."
    );
    describe_counter!("fluxmesh_mqtt_wills_published_total", "MQTT wills published, by why the connection ended.");
    describe_counter!("fluxmesh_mqtt_sessions_resumed_total", "Persistent MQTT sessions that came back.");
    describe_counter!("fluxmesh_mqtt_replayed_total", "Messages sent to resumed sessions from the streams.");
    describe_counter!("fluxmesh_mqtt_replay_failed_total", "Resumed sessions' stream replays that failed.");
    describe_counter!("fluxmesh_mqtt_session_saves_total", "Persistent session records written.");
    describe_counter!("fluxmesh_mqtt_session_save_failed_total", "Persistent session record writes that failed.");
    describe_counter!("fluxmesh_mqtt_sessions_corrupt_total", "Unreadable persistent session records.");
    describe_counter!(
        "fluxmesh_mqtt_will_publish_failed_total",
        "MQTT wills that could not be published (the record stays for another node)."
    );
    describe_counter!("fluxmesh_mqtt_will_clear_failed_total", "MQTT will records not cleared.");
    describe_counter!("fluxmesh_mqtt_will_sweep_failed_total", "Sweeps of a departed node's wills that failed.");
    describe_counter!("fluxmesh_mqtt_will_records_bad_total", "Unreadable MQTT will records.");
    describe_counter!("fluxmesh_mqtt_retained_total", "Retained messages set and cleared, by op.");
    describe_counter!(
        "fluxmesh_mqtt_retained_read_failed_total",
        "Subscriptions whose retained messages could not be read."
    );
    describe_counter!(
        "fluxmesh_mqtt_subscribe_failed_total",
        "Subscriptions refused because the streams they need could not be read."
    );
}

/// Counts and logs a refused device message.
pub fn rejected(source: Source, reason: &'static str, detail: &dyn std::fmt::Display) {
    let source = source.as_str();
    metrics::counter!("fluxmesh_ingest_rejected_total", "source" => source, "reason" => reason).increment(1);
    tracing::debug!(source, reason, %detail, "rejected device message");
}
