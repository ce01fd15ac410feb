//! A NATS message as one JSON object, for people watching subjects
//! (`fluxmesh tail`, the console's live tail): a fluxmesh frame in its
//! JSON view ([`fluxmesh_schemas::json`]), a JSON payload as it is, any
//! other bytes as base64.

use serde_json::{json, Value};

/// `{"subject", "frame": …}`, `{"subject", "json": …}` or `{"subject",
/// "payload_base64": …}`.
pub fn json_line(subject: &str, payload: &[u8]) -> Value {
    let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
    if let Ok(frame) = fluxmesh_schemas::frame::access(payload, &mut scratch) {
        return json!({"subject": subject, "frame": fluxmesh_schemas::json::to_value(frame)});
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(value) => json!({"subject": subject, "json": value}),
        Err(_) => {
            use base64::Engine as _;
            json!({"subject": subject, "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload)})
        }
    }
}

/// Returns once the server has processed everything `client` sent before
/// (a subscription above all): a request nobody answers comes back as "no
/// responders" only after the server has read what came before it. A
/// flush alone only writes the socket. Interest still takes a moment to
/// reach the other servers of a NATS cluster.
pub async fn round_trip(client: &async_nats::Client) {
    let subject = format!("_fm.sync.{}", uuid::Uuid::new_v4().simple());
    let asked = client.request(subject, bytes::Bytes::new());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), asked).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_json_and_bytes() {
        let frame = fluxmesh_schemas::Frame::telemetry("s-1", "env/temp", "n1", br#"{"t":1}"#.to_vec());
        let bytes = frame.encode().expect("encode");
        let line = json_line("fm.tel.0.s-1.env.temp", &bytes);
        assert_eq!(line["frame"]["device"], "s-1");
        assert_eq!(line["frame"]["body"]["payload"]["t"], 1);
        assert_eq!(json_line("x", br#"{"a":2}"#)["json"]["a"], 2);
        assert_eq!(json_line("x", &[0xff, 0x00])["payload_base64"], "/wA=");
    }
}
