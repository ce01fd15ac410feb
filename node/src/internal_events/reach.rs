//! Events of the node's reach: cut off from the mesh and back, and the
//! NATS connections it moved to another server.

use super::{names, InternalEvent};
use metrics::{counter, gauge};
use std::time::Duration;

/// The node stopped serving devices: cut off from the mesh for longer
/// than `cluster.cut_off_grace_ms`.
#[derive(Debug)]
pub struct CutOff {
    /// Since the last heartbeat the mesh acknowledged.
    pub silent_for: Duration,
    /// MQTT connections it is closing.
    pub connections: usize,
}

impl InternalEvent for CutOff {
    fn emit(self) {
        gauge!(names::NODE_CUT_OFF).set(1.0);
        counter!(names::NODE_CUT_OFFS_TOTAL).increment(1);
        tracing::warn!(
            silent_ms = self.silent_for.as_millis() as u64,
            connections = self.connections,
            "cut off from the mesh: no heartbeat acknowledged, leases lapsed; closing MQTT connections and refusing new ones until NATS answers again"
        );
    }
}

/// The node serves devices again: a heartbeat was acknowledged.
#[derive(Debug)]
pub struct BackInTouch {
    /// How long it did not serve.
    pub out_for: Duration,
}

impl InternalEvent for BackInTouch {
    fn emit(self) {
        gauge!(names::NODE_CUT_OFF).set(0.0);
        tracing::info!(out_ms = self.out_for.as_millis() as u64, "back in touch with the mesh; serving devices again");
    }
}

/// A NATS connection that looked up but could not reach JetStream was
/// moved to another server.
#[derive(Debug)]
pub struct ForcedReconnect {
    /// `control` (heartbeats, leases) or `data` (telemetry, sessions).
    pub connection: &'static str,
    /// How long it had not worked.
    pub failing_for: Duration,
}

impl InternalEvent for ForcedReconnect {
    fn emit(self) {
        counter!(names::NATS_FORCED_RECONNECTS_TOTAL, "connection" => self.connection).increment(1);
        tracing::warn!(
            connection = self.connection,
            failing_ms = self.failing_for.as_millis() as u64,
            "NATS connection is up but JetStream does not answer through it; reconnecting to another server"
        );
    }
}
