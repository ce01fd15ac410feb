//! MQTT 5 message properties that travel with a message to its
//! subscribers: payload format, content type, response topic, correlation
//! data and user properties. They are stored with the message as one NATS
//! header (`Fm-Mqtt-Props`, JSON), so a message published on one node keeps
//! them when a subscriber on another node reads it, and any NATS client can
//! read them too. A message expiry is stored apart, as the time it expires
//! (`Fm-Expires-Ms`); a subscriber is sent what is left of it.

use base64::Engine as _;
use rumqttc::v5::mqttbytes::v5::{LastWillProperties, PublishProperties};
use serde::{Deserialize, Serialize};

/// Now, in ms since the Unix epoch (message expiry is kept as a time).
pub fn now_ms() -> u64 {
    u64::try_from(fluxmesh_schemas::frame::now_us() / 1000).unwrap_or(0)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProps {
    #[serde(rename = "pfi", default, skip_serializing_if = "Option::is_none")]
    pub payload_format: Option<u8>,
    #[serde(rename = "ct", default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(rename = "rt", default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Stored as base64.
    #[serde(rename = "cd", default, skip_serializing_if = "Option::is_none", with = "b64")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(rename = "up", default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<(String, String)>,
}

mod b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| base64::engine::general_purpose::STANDARD.decode(t).map_err(serde::de::Error::custom)).transpose()
    }
}

impl MessageProps {
    pub fn is_empty(&self) -> bool {
        *self == MessageProps::default()
    }

    /// The properties of an incoming PUBLISH that go on with the message
    /// (not its topic alias, expiry or subscription identifiers).
    pub fn from_v5(p: PublishProperties) -> Option<MessageProps> {
        MessageProps {
            payload_format: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(|b| b.to_vec()),
            user: p.user_properties,
        }
        .non_empty()
    }

    /// The same for a will (its delay and expiry are read apart).
    pub fn from_will(p: LastWillProperties) -> Option<MessageProps> {
        MessageProps {
            payload_format: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(|b| b.to_vec()),
            user: p.user_properties,
        }
        .non_empty()
    }

    fn non_empty(self) -> Option<MessageProps> {
        (!self.is_empty()).then_some(self)
    }

    pub fn to_v5(&self) -> PublishProperties {
        PublishProperties {
            payload_format_indicator: self.payload_format,
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone().map(bytes::Bytes::from),
            user_properties: self.user.clone(),
            ..PublishProperties::default()
        }
    }

    /// The header value (JSON: one line, as NATS headers need).
    pub fn to_header(&self) -> String {
        // Strings, numbers and lists of pairs always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_header(value: &str) -> Result<MessageProps, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// A payload declared UTF-8 (payload format 1) that is not.
    pub fn payload_format_invalid(&self, payload: &[u8]) -> bool {
        self.payload_format == Some(1) && std::str::from_utf8(payload).is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_survive_the_header() {
        let props = MessageProps {
            payload_format: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/a\nb".into()),
            correlation_data: Some(vec![0, 255, 10]),
            user: vec![("a".into(), "2".into()), ("a".into(), "3".into())],
        };
        let header = props.to_header();
        assert!(!header.contains('\n') && !header.contains('\r'), "one line: {header}");
        assert_eq!(MessageProps::from_header(&header).expect("parse"), props);
        assert_eq!(MessageProps::default().to_header(), "{}");
    }
}
