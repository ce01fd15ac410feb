//! The NATS headers on every published frame, so that a client can route,
//! filter and dedupe without reading rkyv.
//!
//! | header | value |
//! |---|---|
//! | `Nats-Msg-Id` | the frame id, 32 lower-case hex digits (JetStream dedupe key) |
//! | `Content-Type` | [`crate::frame::CONTENT_TYPE`], naming the schema version |
//! | `Fm-Device` | the device id, escaped as a subject token |
//! | `Fm-Channel` | the channel levels, each escaped as a subject token, joined by `/` |
//! | `Fm-Kind` | `telemetry`, `state`, `alert`, `agg`, `event` or `error` |
//! | `Fm-Time-Us` | receive time, µs since the Unix epoch |
//! | `Fm-Device-Time-Us` | device time, µs since the Unix epoch (only when known) |
//! | `Fm-Origin` | the node that received or produced the frame, escaped |
//!
//! Values are escaped because NATS header values cannot carry line breaks and
//! device ids can contain anything.

use crate::frame::{Frame, CONTENT_TYPE};
use crate::subject::{escape_token, push_escaped};

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
pub const DEVICE: &str = "Fm-Device";
pub const CHANNEL: &str = "Fm-Channel";
pub const KIND: &str = "Fm-Kind";
pub const TIME_US: &str = "Fm-Time-Us";
pub const DEVICE_TIME_US: &str = "Fm-Device-Time-Us";
pub const ORIGIN: &str = "Fm-Origin";
/// The QoS an MQTT client published with, on telemetry and plain messages,
/// when it is not 1 (absent: 1, as HTTP ingest gives). A subscriber gets
/// the message at the lower of this and its granted QoS.
pub const QOS: &str = "Fm-Qos";
/// `1` on an MQTT message that was published with the retain flag.
pub const RETAIN: &str = "Fm-Retain";
/// An MQTT 5 message's properties for its subscribers, as one line of
/// JSON: `pfi` payload format, `ct` content type, `rt` response topic,
/// `cd` correlation data (base64), `up` user properties (`[[key, value]]`).
pub const MQTT_PROPS: &str = "Fm-Mqtt-Props";
/// When an MQTT 5 message with a message expiry expires, in ms since the
/// Unix epoch; subscribers are not sent it after that.
pub const EXPIRES_MS: &str = "Fm-Expires-Ms";
/// The MQTT client that published the message, escaped like `Fm-Device`;
/// set while the client holds a no-local subscription.
pub const CLIENT: &str = "Fm-Client";

/// The escaped header form of a channel: each level escaped, joined by `/`.
pub fn escape_channel(channel: &str) -> String {
    let mut out = String::with_capacity(channel.len() + 4);
    for (i, level) in channel.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        push_escaped(&mut out, level);
    }
    out
}

/// The `(name, value)` header pairs of `frame`.
pub fn for_frame(frame: &Frame) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(8);
    headers.push((MSG_ID, frame.id.to_string()));
    headers.push((CONTENT_TYPE_HEADER, CONTENT_TYPE.to_owned()));
    headers.push((DEVICE, escape_token(&frame.device).into_owned()));
    headers.push((CHANNEL, escape_channel(&frame.channel)));
    headers.push((KIND, frame.kind().as_str().to_owned()));
    headers.push((TIME_US, frame.received_time_us.to_string()));
    if let Some(t) = frame.device_time_us {
        headers.push((DEVICE_TIME_US, t.to_string()));
    }
    headers.push((ORIGIN, escape_token(&frame.origin).into_owned()));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_no_line_breaks() {
        let frame = Frame::telemetry("evil\r\nX-Injected: 1", "a b/c\nd", "node 1", vec![]);
        for (name, value) in for_frame(&frame) {
            assert!(!value.contains(['\r', '\n']), "{name}: {value:?}");
        }
        assert_eq!(escape_channel("a b/c"), "a%20b/c");
    }
}
