//! The `[mqtt]` section of the node config.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The embedded MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// MQTT listener (3.1.1 and 5, told apart by the CONNECT).
    pub listen: SocketAddr,
    /// Connections the broker accepts at most; more are refused.
    pub max_connections: usize,
    /// Time a client has to send CONNECT after opening the socket.
    pub connection_timeout_ms: u16,
    /// Publishes one connection may have awaiting their JetStream ack; at
    /// this many the node stops reading the connection (backpressure).
    pub max_inflight: usize,
    /// Messages one subscriber may have queued on this node; when full,
    /// more are dropped for it and counted.
    pub session_queue: usize,
    /// QoS 1/2 messages sent to one subscriber and not yet acknowledged
    /// (an MQTT 5 client's receive maximum lowers it).
    pub max_inflight_out: u16,
    /// MQTT 5 clients that ask for a longer keep-alive (or none) are told
    /// to use this many seconds (CONNACK server keep alive); 0 takes what
    /// they ask. MQTT 3.1.1 clients always keep their own.
    pub server_keep_alive_secs: u16,
    /// Topic aliases an MQTT 5 client may set per connection (0: none).
    pub topic_alias_max: u16,
    /// Topic filters under which plain topics (outside `devices/`) may be
    /// used; empty turns plain pub/sub off.
    pub plain_topics: Vec<String>,
    /// Topic filters no client may publish to (refused and counted) or
    /// subscribe within (SUBACK failure), device topics included.
    pub deny_topics: Vec<String>,
    /// How often a persistent session's progress (cursors) is stored while
    /// it moves. A node killed loses at most this much: those messages are
    /// sent again.
    pub session_save_interval_ms: u64,
    /// Serve plain MQTT on `listen`. Turn off when only TLS may be used.
    pub tcp_enabled: bool,
    /// Serve MQTT over WebSocket (subprotocol `mqtt`, any path) on
    /// `ws_listen`.
    pub ws_enabled: bool,
    pub ws_listen: SocketAddr,
    /// Serve MQTT over secure WebSocket on `wss_listen`, with the TLS
    /// certificate and key below.
    pub wss_enabled: bool,
    pub wss_listen: SocketAddr,
    /// Serve MQTT over TLS on `tls_listen`, with this PEM certificate chain
    /// and key.
    pub tls_enabled: bool,
    pub tls_listen: SocketAddr,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// PEM CA bundle: when set, TLS clients must present a certificate
    /// signed by it (they still authenticate as devices).
    pub tls_client_ca_file: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: 10_000,
            connection_timeout_ms: 5000,
            max_inflight: 100,
            session_queue: 1000,
            max_inflight_out: 32,
            server_keep_alive_secs: 60,
            topic_alias_max: 64,
            plain_topics: vec!["#".to_owned()],
            deny_topics: Vec::new(),
            session_save_interval_ms: 1000,
            tcp_enabled: true,
            ws_enabled: false,
            ws_listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            wss_enabled: false,
            wss_listen: SocketAddr::from(([0, 0, 0, 0], 8084)),
            tls_enabled: false,
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
        }
    }
}
