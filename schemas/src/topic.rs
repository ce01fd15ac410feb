//! MQTT topics as devices and clients use them: a device topic
//! `devices/{device}/{channel...}`, a plain topic (anything else), their
//! limits, and why one is refused ([`TopicError`]). [`crate::subject`]
//! maps them onto NATS subjects.

/// Longest device id accepted, in bytes, before escaping.
pub const MAX_DEVICE_ID_LEN: usize = 256;
/// Longest MQTT topic accepted, in bytes, before escaping.
pub const MAX_TOPIC_LEN: usize = 1024;
/// Most levels a channel may have.
pub const MAX_CHANNEL_LEVELS: usize = 16;
/// The first MQTT topic level of every device topic.
pub const DEVICE_TOPIC_ROOT: &str = "devices";
/// The channel on which a device receives commands; devices cannot publish
/// telemetry on it.
pub const COMMAND_CHANNEL: &str = "cmd";

/// Why a topic, token or prefix was refused. Each variant has a stable
/// [`TopicError::reason`] used as a metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic must have the form devices/{{device_id}}/{{channel...}}")]
    NotDeviceTopic,
    #[error("device id is empty")]
    EmptyDevice,
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} bytes")]
    DeviceTooLong,
    #[error("topic has no channel after the device id")]
    MissingChannel,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TopicTooLong,
    #[error("channel has more than {MAX_CHANNEL_LEVELS} levels")]
    TooManyLevels,
    #[error("topic contains an MQTT wildcard (+ or #)")]
    Wildcard,
    #[error("channel `cmd` is reserved for commands to the device")]
    ReservedChannel,
    #[error("invalid subject token `{token}`: {why}")]
    BadToken { token: String, why: &'static str },
    #[error("invalid subject prefix `{prefix}`: use 1-32 characters from A-Z a-z 0-9 _ -")]
    BadPrefix { prefix: String },
    #[error("subject `{subject}` is not a fluxmesh subject: {why}")]
    BadSubject { subject: String, why: &'static str },
    #[error("topic is empty")]
    EmptyTopic,
    #[error("topics starting with `$` are reserved for the broker")]
    Reserved,
    #[error("topic contains U+0000")]
    NullCharacter,
}

impl TopicError {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TopicError::NotDeviceTopic => "not_device_topic",
            TopicError::EmptyDevice => "empty_device",
            TopicError::DeviceTooLong => "device_too_long",
            TopicError::MissingChannel => "missing_channel",
            TopicError::TopicTooLong => "topic_too_long",
            TopicError::TooManyLevels => "too_many_levels",
            TopicError::Wildcard => "wildcard",
            TopicError::ReservedChannel => "reserved_channel",
            TopicError::BadToken { .. } => "bad_token",
            TopicError::BadPrefix { .. } => "bad_prefix",
            TopicError::BadSubject { .. } => "bad_subject",
            TopicError::EmptyTopic => "empty_topic",
            TopicError::Reserved => "reserved_topic",
            TopicError::NullCharacter => "null_character",
        }
    }
}

/// A parsed device topic `devices/{device}/{channel...}`, borrowing the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    /// The device id (topic level 2).
    pub device: &'a str,
    /// The channel: the remaining levels joined by `/`, as the device sent them.
    pub channel: &'a str,
}

impl<'a> DeviceTopic<'a> {
    /// Parses an MQTT topic a device published on.
    pub fn parse(topic: &'a str) -> Result<Self, TopicError> {
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TopicTooLong);
        }
        let rest = topic
            .strip_prefix(DEVICE_TOPIC_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::NotDeviceTopic)?;
        let (device, channel) = rest.split_once('/').ok_or(TopicError::MissingChannel)?;
        Self::new(device, channel)
    }

    /// Checks a device id and channel given separately (HTTP ingest).
    pub fn new(device: &'a str, channel: &'a str) -> Result<Self, TopicError> {
        if device.is_empty() {
            return Err(TopicError::EmptyDevice);
        }
        if device.len() > MAX_DEVICE_ID_LEN {
            return Err(TopicError::DeviceTooLong);
        }
        if device.len() + channel.len() + DEVICE_TOPIC_ROOT.len() + 2 > MAX_TOPIC_LEN {
            return Err(TopicError::TopicTooLong);
        }
        if device.contains(['+', '#', '/']) || channel.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        if channel.split('/').count() > MAX_CHANNEL_LEVELS {
            return Err(TopicError::TooManyLevels);
        }
        if channel.split('/').next() == Some(COMMAND_CHANNEL) {
            return Err(TopicError::ReservedChannel);
        }
        Ok(DeviceTopic { device, channel })
    }
}

/// A plain MQTT topic: any topic outside `devices/`, published and
/// subscribed to across the mesh but not processed by rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainTopic<'a>(&'a str);

impl<'a> PlainTopic<'a> {
    /// Checks a topic a client published on that is not a device topic.
    /// Refuses the device topic space (`devices` and below), wildcards,
    /// `$` topics (the broker's own), U+0000 and over-long topics.
    pub fn parse(topic: &'a str) -> Result<Self, TopicError> {
        if topic.is_empty() {
            return Err(TopicError::EmptyTopic);
        }
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TopicTooLong);
        }
        if topic.split('/').next() == Some(DEVICE_TOPIC_ROOT) {
            return Err(TopicError::NotDeviceTopic);
        }
        if topic.starts_with('$') {
            return Err(TopicError::Reserved);
        }
        if topic.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        if topic.contains('\0') {
            return Err(TopicError::NullCharacter);
        }
        Ok(PlainTopic(topic))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics() {
        let t = DeviceTopic::parse("devices/d1/env/temp").expect("valid");
        assert_eq!((t.device, t.channel), ("d1", "env/temp"));
        assert_eq!(DeviceTopic::parse("devices/d1"), Err(TopicError::MissingChannel));
        assert_eq!(DeviceTopic::parse("devices//x"), Err(TopicError::EmptyDevice));
        assert_eq!(DeviceTopic::parse("other/d1/x"), Err(TopicError::NotDeviceTopic));
        assert_eq!(DeviceTopic::parse("devicesX/d1/x"), Err(TopicError::NotDeviceTopic));
        assert_eq!(DeviceTopic::parse("devices/d1/cmd"), Err(TopicError::ReservedChannel));
        assert_eq!(DeviceTopic::parse("devices/d1/a/#"), Err(TopicError::Wildcard));
        let long = format!("devices/{}/x", "d".repeat(MAX_DEVICE_ID_LEN + 1));
        assert_eq!(DeviceTopic::parse(&long), Err(TopicError::DeviceTooLong));
    }
}
