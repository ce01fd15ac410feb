//! The names of the metrics the node emits, in one place: call sites use
//! these constants, and every one is described when the recorder is
//! installed (`ALL`, with the mesh layer's `fluxmesh_mesh::metric_names::ALL`).
//! README.md lists them all; a test keeps it so.

pub use fluxmesh_mesh::metric_names::{Kind, Metric};

pub const ACL_DENIED_TOTAL: &str = "fluxmesh_acl_denied_total";
pub const AGG_LATE_TOTAL: &str = "fluxmesh_agg_late_total";
pub const AGG_OVERFLOW_TOTAL: &str = "fluxmesh_agg_overflow_total";
pub const AGG_UPDATES_TOTAL: &str = "fluxmesh_agg_updates_total";
pub const AUTH_ATTEMPTS_TOTAL: &str = "fluxmesh_auth_attempts_total";
pub const CONSOLE_TAILS: &str = "fluxmesh_console_tails";
pub const CONSOLE_TAILS_REFUSED_TOTAL: &str = "fluxmesh_console_tails_refused_total";
pub const COMMANDS_SETTLED_TOTAL: &str = "fluxmesh_commands_settled_total";
pub const COMMANDS_TOTAL: &str = "fluxmesh_commands_total";
pub const DERIVED_FRAMES_TOTAL: &str = "fluxmesh_derived_frames_total";
pub const HISTORY_BAD_REQUESTS_TOTAL: &str = "fluxmesh_history_bad_requests_total";
pub const HISTORY_READ_ERRORS_TOTAL: &str = "fluxmesh_history_read_errors_total";
pub const HTTP_UNAUTHORIZED_TOTAL: &str = "fluxmesh_http_unauthorized_total";
pub const INGEST_FAILED_TOTAL: &str = "fluxmesh_ingest_failed_total";
pub const INGEST_MESSAGES_TOTAL: &str = "fluxmesh_ingest_messages_total";
pub const INGEST_REJECTED_TOTAL: &str = "fluxmesh_ingest_rejected_total";
pub const INGEST_SECONDS: &str = "fluxmesh_ingest_seconds";
pub const INGEST_THROTTLED_TOTAL: &str = "fluxmesh_ingest_throttled_total";
pub const JSON_MIRROR_FAILED_TOTAL: &str = "fluxmesh_json_mirror_failed_total";
pub const NATS_FORCED_RECONNECTS_TOTAL: &str = "fluxmesh_nats_forced_reconnects_total";
pub const NODE_CUT_OFF: &str = "fluxmesh_node_cut_off";
pub const NODE_CUT_OFFS_TOTAL: &str = "fluxmesh_node_cut_offs_total";
pub const MQTT_CATCH_UPS_TOTAL: &str = "fluxmesh_mqtt_catch_ups_total";
pub const MQTT_CONNECTIONS: &str = "fluxmesh_mqtt_connections";
pub const MQTT_DELIVERIES_DEFERRED_TOTAL: &str = "fluxmesh_mqtt_deliveries_deferred_total";
pub const MQTT_DELIVERIES_DROPPED_TOTAL: &str = "fluxmesh_mqtt_deliveries_dropped_total";
pub const MQTT_DELIVERIES_QUEUED_TOTAL: &str = "fluxmesh_mqtt_deliveries_queued_total";
pub const MQTT_DELIVERIES_SKIPPED_TOTAL: &str = "fluxmesh_mqtt_deliveries_skipped_total";
pub const MQTT_DELIVERIES_TOTAL: &str = "fluxmesh_mqtt_deliveries_total";
pub const MQTT_DENIED_TOPICS_TOTAL: &str = "fluxmesh_mqtt_denied_topics_total";
pub const MQTT_DISCONNECTS_TOTAL: &str = "fluxmesh_mqtt_disconnects_total";
pub const MQTT_FEED_FAILURES_TOTAL: &str = "fluxmesh_mqtt_feed_failures_total";
pub const MQTT_FEED_MESSAGES_TOTAL: &str = "fluxmesh_mqtt_feed_messages_total";
pub const MQTT_FEED_UNREADABLE_TOTAL: &str = "fluxmesh_mqtt_feed_unreadable_total";
pub const MQTT_PROTOCOL_ERRORS_TOTAL: &str = "fluxmesh_mqtt_protocol_errors_total";
pub const MQTT_REFUSED_TOTAL: &str = "fluxmesh_mqtt_refused_total";
pub const MQTT_REPLAY_FAILED_TOTAL: &str = "fluxmesh_mqtt_replay_failed_total";
pub const MQTT_REPLAYED_TOTAL: &str = "fluxmesh_mqtt_replayed_total";
pub const MQTT_RETAINED_READ_FAILED_TOTAL: &str = "fluxmesh_mqtt_retained_read_failed_total";
pub const MQTT_RETAINED_TOTAL: &str = "fluxmesh_mqtt_retained_total";
pub const MQTT_SESSION_ANNOUNCE_BAD_TOTAL: &str = "fluxmesh_mqtt_session_announce_bad_total";
pub const MQTT_SESSION_ANNOUNCE_FAILED_TOTAL: &str = "fluxmesh_mqtt_session_announce_failed_total";
pub const MQTT_SESSION_SAVE_FAILED_TOTAL: &str = "fluxmesh_mqtt_session_save_failed_total";
pub const MQTT_SESSION_SAVES_TOTAL: &str = "fluxmesh_mqtt_session_saves_total";
pub const MQTT_SESSIONS_CORRUPT_TOTAL: &str = "fluxmesh_mqtt_sessions_corrupt_total";
pub const MQTT_SESSIONS_RESUMED_TOTAL: &str = "fluxmesh_mqtt_sessions_resumed_total";
pub const MQTT_SESSIONS_REVOKED_TOTAL: &str = "fluxmesh_mqtt_sessions_revoked_total";
pub const MQTT_SHARED_ACK_FAILED_TOTAL: &str = "fluxmesh_mqtt_shared_ack_failed_total";
pub const MQTT_SHARED_DELIVERIES_TOTAL: &str = "fluxmesh_mqtt_shared_deliveries_total";
pub const MQTT_SHARED_GIVEN_BACK_TOTAL: &str = "fluxmesh_mqtt_shared_given_back_total";
pub const MQTT_SUBSCRIBE_FAILED_TOTAL: &str = "fluxmesh_mqtt_subscribe_failed_total";
pub const MQTT_SUBSCRIPTIONS: &str = "fluxmesh_mqtt_subscriptions";
pub const MQTT_TLS_HANDSHAKE_FAILURES_TOTAL: &str = "fluxmesh_mqtt_tls_handshake_failures_total";
pub const MQTT_WILL_CLEAR_FAILED_TOTAL: &str = "fluxmesh_mqtt_will_clear_failed_total";
pub const MQTT_WILL_PUBLISH_FAILED_TOTAL: &str = "fluxmesh_mqtt_will_publish_failed_total";
pub const MQTT_WILL_RECORDS_BAD_TOTAL: &str = "fluxmesh_mqtt_will_records_bad_total";
pub const MQTT_WILL_SWEEP_FAILED_TOTAL: &str = "fluxmesh_mqtt_will_sweep_failed_total";
pub const MQTT_WILLS_CANCELLED_TOTAL: &str = "fluxmesh_mqtt_wills_cancelled_total";
pub const MQTT_WILLS_PUBLISHED_TOTAL: &str = "fluxmesh_mqtt_wills_published_total";
pub const MQTT_WS_HANDSHAKE_FAILURES_TOTAL: &str = "fluxmesh_mqtt_ws_handshake_failures_total";
pub const PG_BATCH_ROWS: &str = "fluxmesh_pg_batch_rows";
pub const PG_BATCH_SECONDS: &str = "fluxmesh_pg_batch_seconds";
pub const PG_MAINTENANCE_ERRORS_TOTAL: &str = "fluxmesh_pg_maintenance_errors_total";
pub const PG_PARTITIONS_DROPPED_TOTAL: &str = "fluxmesh_pg_partitions_dropped_total";
pub const PG_POOL_CONNECTIONS: &str = "fluxmesh_pg_pool_connections";
pub const PG_READ_FALLBACKS_TOTAL: &str = "fluxmesh_pg_read_fallbacks_total";
pub const PG_READS_TOTAL: &str = "fluxmesh_pg_reads_total";
pub const PG_REPLICA_LAG_SECONDS: &str = "fluxmesh_pg_replica_lag_seconds";
pub const PG_REPLICA_USABLE: &str = "fluxmesh_pg_replica_usable";
pub const PG_ROWS_DUPLICATE_TOTAL: &str = "fluxmesh_pg_rows_duplicate_total";
pub const PG_ROWS_EXPIRED_TOTAL: &str = "fluxmesh_pg_rows_expired_total";
pub const PG_ROWS_RAW_FALLBACK_TOTAL: &str = "fluxmesh_pg_rows_raw_fallback_total";
pub const PG_ROWS_WRITTEN_TOTAL: &str = "fluxmesh_pg_rows_written_total";
pub const PG_WRITE_ERRORS_TOTAL: &str = "fluxmesh_pg_write_errors_total";
pub const PG_WRITE_LAG_SECONDS: &str = "fluxmesh_pg_write_lag_seconds";
pub const PG_WRITER_QUEUE: &str = "fluxmesh_pg_writer_queue";
pub const PLUGIN_CALL_SECONDS: &str = "fluxmesh_plugin_call_seconds";
pub const PLUGIN_ERRORS_TOTAL: &str = "fluxmesh_plugin_errors_total";
pub const PLUGIN_LOAD_ERRORS_TOTAL: &str = "fluxmesh_plugin_load_errors_total";
pub const PLUGIN_POOL_HITS_TOTAL: &str = "fluxmesh_plugin_pool_hits_total";
pub const PLUGIN_POOL_MISSES_TOTAL: &str = "fluxmesh_plugin_pool_misses_total";
pub const PLUGIN_UPLOADS_REFUSED_TOTAL: &str = "fluxmesh_plugin_uploads_refused_total";
pub const PLUGINS_LOADED: &str = "fluxmesh_plugins_loaded";
pub const PUBLISH_DUPLICATES_TOTAL: &str = "fluxmesh_publish_duplicates_total";
pub const PUBLISH_IN_FLIGHT: &str = "fluxmesh_publish_in_flight";
pub const RULE_COMMANDS_TOTAL: &str = "fluxmesh_rule_commands_total";
pub const RULE_DROPPED_TOTAL: &str = "fluxmesh_rule_dropped_total";
pub const RULE_ERRORS_TOTAL: &str = "fluxmesh_rule_errors_total";
pub const RULE_LOAD_ERRORS_TOTAL: &str = "fluxmesh_rule_load_errors_total";
pub const RULE_UPLOADS_REFUSED_TOTAL: &str = "fluxmesh_rule_uploads_refused_total";
pub const RULES_ACTIVE: &str = "fluxmesh_rules_active";
pub const RULES_SECONDS: &str = "fluxmesh_rules_seconds";
pub const SHARD_BAD_MESSAGES_TOTAL: &str = "fluxmesh_shard_bad_messages_total";
pub const SHARD_BATCH_SECONDS: &str = "fluxmesh_shard_batch_seconds";
pub const SHARD_CHECKPOINT_DEVICES_TOTAL: &str = "fluxmesh_shard_checkpoint_devices_total";
pub const SHARD_CHECKPOINT_SECONDS: &str = "fluxmesh_shard_checkpoint_seconds";
pub const SHARD_CHECKPOINT_SNAPSHOTS_TOTAL: &str = "fluxmesh_shard_checkpoint_snapshots_total";
pub const SHARD_CHECKPOINT_WRITES_TOTAL: &str = "fluxmesh_shard_checkpoint_writes_total";
pub const SHARD_COMMIT_WAIT_SECONDS: &str = "fluxmesh_shard_commit_wait_seconds";
pub const SHARD_MESSAGES_TOTAL: &str = "fluxmesh_shard_messages_total";
pub const SHARD_REDELIVERIES_SKIPPED_TOTAL: &str = "fluxmesh_shard_redeliveries_skipped_total";

/// Every metric above, with its kind and help text.
pub const ALL: &[Metric] = &[
    Metric { name: ACL_DENIED_TOTAL, kind: Kind::Counter, help: "Publishes and subscriptions refused by a device's ACL." },
    Metric { name: AGG_LATE_TOTAL, kind: Kind::Counter, help: "Field values aggregated; values too late for their window; values refused for too many open windows." },
    Metric { name: AGG_OVERFLOW_TOTAL, kind: Kind::Counter, help: "Field values aggregated; values too late for their window; values refused for too many open windows." },
    Metric { name: AGG_UPDATES_TOTAL, kind: Kind::Counter, help: "Field values aggregated; values too late for their window; values refused for too many open windows." },
    Metric { name: AUTH_ATTEMPTS_TOTAL, kind: Kind::Counter, help: "Device authentications (mqtt, http): ok, anonymous, no_credentials, bad_credentials, username_mismatch, disabled, store_unavailable, malformed." },
    Metric { name: CONSOLE_TAILS, kind: Kind::Gauge, help: "Console live tails open on this node (at most 16)." },
    Metric { name: CONSOLE_TAILS_REFUSED_TOTAL, kind: Kind::Counter, help: "Console live tails refused, by reason (bad_query, bad_subject, too_many, nats)." },
    Metric { name: COMMANDS_SETTLED_TOTAL, kind: Kind::Counter, help: "Command requests answered (delivered, queued, rejected, failed); queued commands settled (delivered, expired)." },
    Metric { name: COMMANDS_TOTAL, kind: Kind::Counter, help: "Command requests answered (delivered, queued, rejected, failed); queued commands settled (delivered, expired)." },
    Metric { name: DERIVED_FRAMES_TOTAL, kind: Kind::Counter, help: "Telemetry messages processed by shard workers; derived frames stored (state, event, alert, agg, error)." },
    Metric { name: HISTORY_BAD_REQUESTS_TOTAL, kind: Kind::Counter, help: "History requests refused (400), and failed (503)." },
    Metric { name: HISTORY_READ_ERRORS_TOTAL, kind: Kind::Counter, help: "History requests refused (400), and failed (503)." },
    Metric { name: HTTP_UNAUTHORIZED_TOTAL, kind: Kind::Counter, help: "Admin API and ingest requests refused with 401 (no_token, bad_token, admin_token_unset, bad_credentials, …)." },
    Metric { name: INGEST_FAILED_TOTAL, kind: Kind::Counter, help: "Device messages accepted but not stored after every retry, by source and reason." },
    Metric { name: INGEST_MESSAGES_TOTAL, kind: Kind::Counter, help: "Device messages stored in JetStream, by source (mqtt, http)." },
    Metric { name: INGEST_REJECTED_TOTAL, kind: Kind::Counter, help: "Device messages refused, by source and reason." },
    Metric { name: INGEST_SECONDS, kind: Kind::Histogram, help: "Time from receiving a device message to its JetStream ack." },
    Metric { name: INGEST_THROTTLED_TOTAL, kind: Kind::Counter, help: "Times an MQTT device ran out of rate tokens and was slowed." },
    Metric { name: JSON_MIRROR_FAILED_TOTAL, kind: Kind::Counter, help: "JSON mirror publishes that failed." },
    Metric { name: NATS_FORCED_RECONNECTS_TOTAL, kind: Kind::Counter, help: "NATS connections moved to another server because JetStream stopped answering through them (control: heartbeats lapsed; data: publishes failing with no ack), by connection." },
    Metric { name: NODE_CUT_OFF, kind: Kind::Gauge, help: "1 while the node is cut off from the mesh and not serving devices (MQTT connections closed and refused, /readyz failing)." },
    Metric { name: NODE_CUT_OFFS_TOTAL, kind: Kind::Counter, help: "Times the node was cut off from the mesh for longer than cluster.cut_off_grace_ms and stopped serving devices." },
    Metric { name: MQTT_CATCH_UPS_TOTAL, kind: Kind::Counter, help: "Catch-ups: subscribers reading back from a stream what did not fit in their queue." },
    Metric { name: MQTT_CONNECTIONS, kind: Kind::Gauge, help: "Open MQTT connections." },
    Metric { name: MQTT_DELIVERIES_DEFERRED_TOTAL, kind: Kind::Counter, help: "Messages that did not fit in an MQTT subscriber's queue and are read back from the stream." },
    Metric { name: MQTT_DELIVERIES_DROPPED_TOTAL, kind: Kind::Counter, help: "Messages an MQTT subscriber did not get, by reason (retained_over_queue)." },
    Metric { name: MQTT_DELIVERIES_QUEUED_TOTAL, kind: Kind::Counter, help: "Messages queued for an MQTT subscriber." },
    Metric { name: MQTT_DELIVERIES_SKIPPED_TOTAL, kind: Kind::Counter, help: "Messages not written to a subscriber by rule: expired (MQTT 5 message expiry), no_local, too_large_for_client (over its maximum packet size), unsubscribed." },
    Metric { name: MQTT_DELIVERIES_TOTAL, kind: Kind::Counter, help: "Messages written to MQTT subscribers, by QoS." },
    Metric { name: MQTT_DENIED_TOPICS_TOTAL, kind: Kind::Counter, help: "Publishes and subscriptions refused by mqtt.deny_topics, by action." },
    Metric { name: MQTT_DISCONNECTS_TOTAL, kind: Kind::Counter, help: "Connections refused (max_connections) and ended (disconnect, peer_closed, keep_alive, taken_over, not_stored, …)." },
    Metric { name: MQTT_FEED_FAILURES_TOTAL, kind: Kind::Counter, help: "Times a subscriber feed could not read its stream and retried." },
    Metric { name: MQTT_FEED_MESSAGES_TOTAL, kind: Kind::Counter, help: "Stored messages this node read back from the streams for its MQTT subscribers." },
    Metric { name: MQTT_FEED_UNREADABLE_TOTAL, kind: Kind::Counter, help: "Stored messages not delivered to subscribers because their subject or frame could not be read, by reason." },
    Metric { name: MQTT_PROTOCOL_ERRORS_TOTAL, kind: Kind::Counter, help: "Connections closed for malformed_packet, oversize, null_in_topic, protocol_version, connect_timeout, acl_denied, …." },
    Metric { name: MQTT_REFUSED_TOTAL, kind: Kind::Counter, help: "Connections refused (max_connections) and ended (disconnect, peer_closed, keep_alive, taken_over, not_stored, …)." },
    Metric { name: MQTT_REPLAY_FAILED_TOTAL, kind: Kind::Counter, help: "Resumed sessions' stream replays that failed." },
    Metric { name: MQTT_REPLAYED_TOTAL, kind: Kind::Counter, help: "Messages sent to resumed sessions from the streams." },
    Metric { name: MQTT_RETAINED_READ_FAILED_TOTAL, kind: Kind::Counter, help: "Subscriptions whose retained messages could not be read." },
    Metric { name: MQTT_RETAINED_TOTAL, kind: Kind::Counter, help: "Retained messages set and cleared, by op." },
    Metric { name: MQTT_SESSION_ANNOUNCE_BAD_TOTAL, kind: Kind::Counter, help: "Unreadable session announcements from other nodes (ignored)." },
    Metric { name: MQTT_SESSION_ANNOUNCE_FAILED_TOTAL, kind: Kind::Counter, help: "Session announcements this node could not send (takeover across nodes then waits for the next one)." },
    Metric { name: MQTT_SESSION_SAVE_FAILED_TOTAL, kind: Kind::Counter, help: "Persistent session record writes that failed." },
    Metric { name: MQTT_SESSION_SAVES_TOTAL, kind: Kind::Counter, help: "Persistent session records written." },
    Metric { name: MQTT_SESSIONS_CORRUPT_TOTAL, kind: Kind::Counter, help: "Unreadable persistent session records." },
    Metric { name: MQTT_SESSIONS_RESUMED_TOTAL, kind: Kind::Counter, help: "Persistent MQTT sessions that came back." },
    Metric { name: MQTT_SESSIONS_REVOKED_TOTAL, kind: Kind::Counter, help: "TLS handshakes that failed or timed out; sessions ended because their credentials changed." },
    Metric { name: MQTT_SHARED_ACK_FAILED_TOTAL, kind: Kind::Counter, help: "Acks of shared-subscription messages that failed." },
    Metric { name: MQTT_SHARED_DELIVERIES_TOTAL, kind: Kind::Counter, help: "Shared-subscription messages handed to a member." },
    Metric { name: MQTT_SHARED_GIVEN_BACK_TOTAL, kind: Kind::Counter, help: "Shared-subscription messages given back because every member's queue was full." },
    Metric { name: MQTT_SUBSCRIBE_FAILED_TOTAL, kind: Kind::Counter, help: "Subscriptions refused because the streams they need could not be read." },
    Metric { name: MQTT_SUBSCRIPTIONS, kind: Kind::Gauge, help: "MQTT subscriptions held by this node's sessions." },
    Metric { name: MQTT_TLS_HANDSHAKE_FAILURES_TOTAL, kind: Kind::Counter, help: "TLS handshakes that failed or timed out; sessions ended because their credentials changed." },
    Metric { name: MQTT_WILL_CLEAR_FAILED_TOTAL, kind: Kind::Counter, help: "MQTT will records not cleared." },
    Metric { name: MQTT_WILL_PUBLISH_FAILED_TOTAL, kind: Kind::Counter, help: "MQTT wills that could not be published (the record stays for another node)." },
    Metric { name: MQTT_WILL_RECORDS_BAD_TOTAL, kind: Kind::Counter, help: "Unreadable MQTT will records." },
    Metric { name: MQTT_WILL_SWEEP_FAILED_TOTAL, kind: Kind::Counter, help: "Sweeps of a departed node's wills that failed." },
    Metric { name: MQTT_WILLS_CANCELLED_TOTAL, kind: Kind::Counter, help: "MQTT 5 wills not sent because the client connected again within its will delay." },
    Metric { name: MQTT_WILLS_PUBLISHED_TOTAL, kind: Kind::Counter, help: "MQTT wills published, by why the connection ended." },
    Metric { name: MQTT_WS_HANDSHAKE_FAILURES_TOTAL, kind: Kind::Counter, help: "MQTT WebSocket upgrades that failed or timed out." },
    Metric { name: PG_BATCH_ROWS, kind: Kind::Histogram, help: "Writer transactions: duration, rows, and time from a shard handing rows over to their commit." },
    Metric { name: PG_BATCH_SECONDS, kind: Kind::Histogram, help: "Writer transactions: duration, rows, and time from a shard handing rows over to their commit." },
    Metric { name: PG_MAINTENANCE_ERRORS_TOTAL, kind: Kind::Counter, help: "Partitions dropped by retention; failed maintenance runs." },
    Metric { name: PG_PARTITIONS_DROPPED_TOTAL, kind: Kind::Counter, help: "Partitions dropped by retention; failed maintenance runs." },
    Metric { name: PG_POOL_CONNECTIONS, kind: Kind::Gauge, help: "Pool size, available, waiting." },
    Metric { name: PG_READ_FALLBACKS_TOTAL, kind: Kind::Counter, help: "History reads by server (replica, primary); reads that went to the primary (no_usable_replica, replica_failed)." },
    Metric { name: PG_READS_TOTAL, kind: Kind::Counter, help: "History reads by server (replica, primary); reads that went to the primary (no_usable_replica, replica_failed)." },
    Metric { name: PG_REPLICA_LAG_SECONDS, kind: Kind::Gauge, help: "Each replica's replay lag and whether reads use it." },
    Metric { name: PG_REPLICA_USABLE, kind: Kind::Gauge, help: "Each replica's replay lag and whether reads use it." },
    Metric { name: PG_ROWS_DUPLICATE_TOTAL, kind: Kind::Counter, help: "History rows inserted; rows already there (replays)." },
    Metric { name: PG_ROWS_EXPIRED_TOTAL, kind: Kind::Counter, help: "Failed write transactions, all retried (duplicate: a replay, written again with ON CONFLICT; transient, data, no_partition, other); rows whose JSON Postgres refused, stored as bytes; rows past retention not stored." },
    Metric { name: PG_ROWS_RAW_FALLBACK_TOTAL, kind: Kind::Counter, help: "Failed write transactions, all retried (duplicate: a replay, written again with ON CONFLICT; transient, data, no_partition, other); rows whose JSON Postgres refused, stored as bytes; rows past retention not stored." },
    Metric { name: PG_ROWS_WRITTEN_TOTAL, kind: Kind::Counter, help: "History rows inserted; rows already there (replays)." },
    Metric { name: PG_WRITE_ERRORS_TOTAL, kind: Kind::Counter, help: "Failed write transactions, all retried (duplicate: a replay, written again with ON CONFLICT; transient, data, no_partition, other); rows whose JSON Postgres refused, stored as bytes; rows past retention not stored." },
    Metric { name: PG_WRITE_LAG_SECONDS, kind: Kind::Histogram, help: "Writer transactions: duration, rows, and time from a shard handing rows over to their commit." },
    Metric { name: PG_WRITER_QUEUE, kind: Kind::Gauge, help: "Batches queued for the writer; time a checkpoint waited for its commits." },
    Metric { name: PLUGIN_CALL_SECONDS, kind: Kind::Histogram, help: "Plugin calls that failed (timeout, memory, trap, bad_output, guest_error, instantiate); call time." },
    Metric { name: PLUGIN_ERRORS_TOTAL, kind: Kind::Counter, help: "Plugin calls that failed (timeout, memory, trap, bad_output, guest_error, instantiate); call time." },
    Metric { name: PLUGIN_LOAD_ERRORS_TOTAL, kind: Kind::Counter, help: "Plugins compiled on this node; stored modules it could not load; uploads refused." },
    Metric { name: PLUGIN_POOL_HITS_TOTAL, kind: Kind::Counter, help: "Calls served by a warm instance / that instantiated one." },
    Metric { name: PLUGIN_POOL_MISSES_TOTAL, kind: Kind::Counter, help: "Calls served by a warm instance / that instantiated one." },
    Metric { name: PLUGIN_UPLOADS_REFUSED_TOTAL, kind: Kind::Counter, help: "Plugins compiled on this node; stored modules it could not load; uploads refused." },
    Metric { name: PLUGINS_LOADED, kind: Kind::Gauge, help: "Plugins compiled on this node; stored modules it could not load; uploads refused." },
    Metric { name: PUBLISH_DUPLICATES_TOTAL, kind: Kind::Counter, help: "Publishes JetStream recognised as duplicates (same Nats-Msg-Id)." },
    Metric { name: PUBLISH_IN_FLIGHT, kind: Kind::Gauge, help: "JetStream publishes awaiting their ack." },
    Metric { name: RULE_COMMANDS_TOTAL, kind: Kind::Counter, help: "Commands sent by rules, by answer (delivered, queued, rejected, no_answer, …)." },
    Metric { name: RULE_DROPPED_TOTAL, kind: Kind::Counter, help: "Rule runs that failed (budget, limit, runtime); messages dropped by rules; time to run all matching rules on a message." },
    Metric { name: RULE_ERRORS_TOTAL, kind: Kind::Counter, help: "Rule runs that failed (budget, limit, runtime); messages dropped by rules; time to run all matching rules on a message." },
    Metric { name: RULE_LOAD_ERRORS_TOTAL, kind: Kind::Counter, help: "Rules running on this node; stored rules it refused; uploads refused." },
    Metric { name: RULE_UPLOADS_REFUSED_TOTAL, kind: Kind::Counter, help: "Rules running on this node; stored rules it refused; uploads refused." },
    Metric { name: RULES_ACTIVE, kind: Kind::Gauge, help: "Rules running on this node; stored rules it refused; uploads refused." },
    Metric { name: RULES_SECONDS, kind: Kind::Histogram, help: "Rule runs that failed (budget, limit, runtime); messages dropped by rules; time to run all matching rules on a message." },
    Metric { name: SHARD_BAD_MESSAGES_TOTAL, kind: Kind::Counter, help: "Corrupt_frame, bad_checkpoint: counted and skipped, never blocking a shard." },
    Metric { name: SHARD_BATCH_SECONDS, kind: Kind::Histogram, help: "Batch processing, checkpoint (commit wait and append), worker start (claim and log load)." },
    Metric { name: SHARD_CHECKPOINT_DEVICES_TOTAL, kind: Kind::Counter, help: "Checkpoint records appended (one per busy shard per interval, however many devices); device states they carried; logs compacted into a snapshot." },
    Metric { name: SHARD_CHECKPOINT_SECONDS, kind: Kind::Histogram, help: "Batch processing, checkpoint (commit wait and append), worker start (claim and log load)." },
    Metric { name: SHARD_CHECKPOINT_SNAPSHOTS_TOTAL, kind: Kind::Counter, help: "Checkpoint records appended (one per busy shard per interval, however many devices); device states they carried; logs compacted into a snapshot." },
    Metric { name: SHARD_CHECKPOINT_WRITES_TOTAL, kind: Kind::Counter, help: "Checkpoint records appended (one per busy shard per interval, however many devices); device states they carried; logs compacted into a snapshot." },
    Metric { name: SHARD_COMMIT_WAIT_SECONDS, kind: Kind::Histogram, help: "Batches queued for the writer; time a checkpoint waited for its commits." },
    Metric { name: SHARD_MESSAGES_TOTAL, kind: Kind::Counter, help: "Telemetry messages processed by shard workers; derived frames stored (state, event, alert, agg, error)." },
    Metric { name: SHARD_REDELIVERIES_SKIPPED_TOTAL, kind: Kind::Counter, help: "Redelivered messages skipped as already applied." },
];
