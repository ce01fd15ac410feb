//! NATS subjects and the escaping of MQTT topic levels into subject tokens.
//!
//! # Subjects
//!
//! | family | subject | stream |
//! |---|---|---|
//! | telemetry | `{prefix}.tel.{shard}.{device}.{channel...}` | `{PREFIX}_TEL` |
//! | derived events | `{prefix}.evt.{shard}.{device}.{kind}` | `{PREFIX}_EVT` |
//! | JSON mirror | `{prefix}.json.{tel or evt}.{...same tokens...}` | none (core NATS) |
//! | commands | `{prefix}.cmd.{device}` | none (request/reply) |
//! | plain MQTT topics | `{prefix}.msg.{level...}` | `{PREFIX}_MSG` |
//! | persistent MQTT sessions | `{prefix}.sess.{client id}` | `{PREFIX}_SESSIONS`, one per subject |
//! | MQTT wills of live sessions | `{prefix}.will.{node}.{incarnation}.{client id}` | `{PREFIX}_WILLS`, one per subject |
//! | retained messages | `{prefix}.ret.{level...}` (every level of the topic) | `{PREFIX}_RETAINED`, one per subject |
//!
//! `{shard}` is the decimal shard number ([`crate::shard_of`]). Each MQTT topic
//! level of the channel becomes one token, so `devices/d1/env/temp` is
//! published on `fm.tel.{shard}.d1.env.temp`.
//!
//! # Token escaping
//!
//! A device id or channel level becomes a subject token by percent-escaping
//! every character that NATS gives a meaning to or that could split a
//! subject: `.`, `*`, `>`, the escape character `%` itself, every Unicode
//! whitespace character and every control character. Each UTF-8 byte of such
//! a character is written as `%XX` with two upper-case hex digits; all other
//! characters (including non-ASCII letters) stay as they are. The empty
//! string is written as a lone `%`.
//!
//! Unescaping accepts only the canonical form (upper-case hex, and only for
//! characters that must be escaped), so the mapping between strings and
//! tokens is one-to-one: no two spellings of a subject name the same device.

use std::borrow::Cow;
use std::fmt::Write as _;

pub use crate::topic::{
    DeviceTopic, PlainTopic, TopicError, COMMAND_CHANNEL, DEVICE_TOPIC_ROOT, MAX_CHANNEL_LEVELS, MAX_DEVICE_ID_LEN,
    MAX_TOPIC_LEN,
};

fn must_escape(c: char) -> bool {
    matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control()
}

fn push_channel_tokens(out: &mut String, channel: &str) {
    for (i, level) in channel.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_escaped(out, level);
    }
}

/// Escapes `raw` into one subject token. Borrows when nothing needs escaping.
pub fn escape_token(raw: &str) -> Cow<'_, str> {
    if raw.is_empty() {
        return Cow::Borrowed("%");
    }
    if !raw.chars().any(must_escape) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    push_escaped(&mut out, raw);
    Cow::Owned(out)
}

/// Appends the escaped form of `raw` to `out`.
pub fn push_escaped(out: &mut String, raw: &str) {
    if raw.is_empty() {
        out.push('%');
        return;
    }
    for c in raw.chars() {
        if must_escape(c) {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

/// Reverses [`escape_token`]. Accepts only canonical tokens.
pub fn unescape_token(token: &str) -> Result<Cow<'_, str>, TopicError> {
    let bad = |why| TopicError::BadToken { token: token.to_owned(), why };
    if token == "%" {
        return Ok(Cow::Borrowed(""));
    }
    if token.is_empty() {
        return Err(bad("empty token"));
    }
    if !token.contains('%') {
        if token.chars().any(must_escape) {
            return Err(bad("unescaped special character"));
        }
        return Ok(Cow::Borrowed(token));
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(|| bad("truncated escape"))?;
            let digit = |b: u8| match b {
                b'0'..=b'9' => Ok(b - b'0'),
                b'A'..=b'F' => Ok(b - b'A' + 10),
                _ => Err(bad("escape is not two upper-case hex digits")),
            };
            out.push(digit(hex[0])? << 4 | digit(hex[1])?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| bad("escapes do not form UTF-8"))?;
    // Canonical form: escaping the decoded string must give back the token.
    if escape_token(&decoded) != token {
        return Err(bad("not in canonical escaped form"));
    }
    Ok(Cow::Owned(decoded))
}

impl DeviceTopic<'_> {
    /// The channel's subject tokens, escaped and joined by `.`.
    pub fn channel_tokens(&self) -> String {
        let mut out = String::with_capacity(self.channel.len() + 4);
        push_channel_tokens(&mut out, self.channel);
        out
    }
}

/// Builds and parses the subjects of one cluster (one prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

/// The subject families a frame can be published on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Device telemetry, `{prefix}.tel.…`.
    Telemetry,
    /// Derived events, `{prefix}.evt.…`.
    Event,
}

impl Family {
    /// The subject token of the family.
    pub fn token(self) -> &'static str {
        match self {
            Family::Telemetry => "tel",
            Family::Event => "evt",
        }
    }
}

/// A subject of the `tel` or `evt` family, taken apart and unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSubject {
    pub family: Family,
    pub shard: u32,
    pub device: String,
    /// For telemetry the channel levels joined by `/`; for events the kind.
    pub rest: String,
}

/// `{PREFIX}_{what}`: the name of a stream or bucket of the cluster with
/// subject prefix `prefix` (upper case, `-` as `_`, as JetStream names
/// allow).
pub fn resource_name(prefix: &str, what: &str) -> String {
    format!("{}_{what}", prefix.to_ascii_uppercase().replace('-', "_"))
}

impl Subjects {
    /// `prefix` must be one token of 1-32 characters from `A-Z a-z 0-9 _ -`
    /// (it also names the streams, `{PREFIX}_TEL`).
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(TopicError::BadPrefix { prefix: prefix.to_owned() });
        }
        Ok(Subjects { prefix: prefix.to_owned() })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{PREFIX}_TEL_{partition}`: the telemetry stream of one partition.
    pub fn telemetry_stream(&self, partition: u32) -> String {
        resource_name(&self.prefix, &format!("TEL_{partition}"))
    }

    /// `{PREFIX}_EVT`.
    pub fn event_stream(&self) -> String {
        resource_name(&self.prefix, "EVT")
    }

    /// `{PREFIX}_CKPT`: the shards' checkpoint logs.
    pub fn checkpoint_stream(&self) -> String {
        resource_name(&self.prefix, "CKPT")
    }

    /// `{PREFIX}_CMDQ`: commands kept for devices that are not connected.
    pub fn command_queue_stream(&self) -> String {
        resource_name(&self.prefix, "CMDQ")
    }

    /// `{PREFIX}_MSG`: messages on plain MQTT topics.
    pub fn message_stream(&self) -> String {
        resource_name(&self.prefix, "MSG")
    }

    /// `{prefix}.msg.{level...}`: one level of the topic per token, escaped
    /// as device channels are (`a//b` → `fm.msg.a.%.b`).
    pub fn message(&self, topic: &PlainTopic<'_>) -> String {
        let mut s = String::with_capacity(self.prefix.len() + topic.as_str().len() + 8);
        s.push_str(&self.prefix);
        s.push_str(".msg.");
        push_channel_tokens(&mut s, topic.as_str());
        s
    }

    /// `{prefix}.msg.>`: every plain topic.
    pub fn message_filter(&self) -> String {
        format!("{}.msg.>", self.prefix)
    }

    /// `{PREFIX}_SESSIONS`: persistent MQTT sessions (subscriptions and
    /// stream positions).
    pub fn session_stream(&self) -> String {
        resource_name(&self.prefix, "SESSIONS")
    }

    /// `{prefix}.sess.{client}`: the persistent session of `client`.
    pub fn session(&self, client: &str) -> String {
        format!("{}.sess.{}", self.prefix, escape_token(client))
    }

    /// `{prefix}.sess.>`.
    pub fn sessions_all(&self) -> String {
        format!("{}.sess.>", self.prefix)
    }

    /// `{PREFIX}_WILLS`: the will of every live MQTT session that has one.
    pub fn will_stream(&self) -> String {
        resource_name(&self.prefix, "WILLS")
    }

    /// `{prefix}.will.{node}.{incarnation}.{client}`: where the will of
    /// `client`'s session on one run of `node` is kept.
    pub fn will(&self, node: &str, incarnation: &str, client: &str) -> String {
        format!("{}.will.{}.{}.{}", self.prefix, escape_token(node), escape_token(incarnation), escape_token(client))
    }

    /// `{prefix}.will.>`, or `{prefix}.will.{node}.>` for one node's.
    pub fn will_filter(&self, node: Option<&str>) -> String {
        match node {
            Some(node) => format!("{}.will.{}.>", self.prefix, escape_token(node)),
            None => format!("{}.will.>", self.prefix),
        }
    }

    /// (node, incarnation, client id) of a will subject.
    pub fn parse_will(&self, subject: &str) -> Result<(String, String, String), TopicError> {
        let bad = |why| TopicError::BadSubject { subject: subject.to_owned(), why };
        let mut tokens = subject.split('.');
        if tokens.next() != Some(self.prefix.as_str()) || tokens.next() != Some("will") {
            return Err(bad("not a will subject"));
        }
        let mut next = || -> Result<String, TopicError> {
            Ok(unescape_token(tokens.next().ok_or_else(|| bad("too few tokens"))?)?.into_owned())
        };
        let (node, incarnation, client) = (next()?, next()?, next()?);
        if tokens.next().is_some() {
            return Err(bad("too many tokens"));
        }
        Ok((node, incarnation, client))
    }

    /// `{PREFIX}_RETAINED`: the last retained message of each topic.
    pub fn retained_stream(&self) -> String {
        resource_name(&self.prefix, "RETAINED")
    }

    /// `{prefix}.ret.{level...}`: where the retained message of `topic` (a
    /// topic name, device or plain) is kept; every level is one token.
    pub fn retained(&self, topic: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + topic.len() + 8);
        s.push_str(&self.prefix);
        s.push_str(".ret.");
        push_channel_tokens(&mut s, topic);
        s
    }

    /// `{prefix}.ret.>`: every retained message.
    pub fn retained_all(&self) -> String {
        format!("{}.ret.>", self.prefix)
    }

    /// The subject filters that select the retained messages an MQTT filter
    /// matches (`+` → `*`; `a/#` → `a` and `a.>`, since `#` includes its
    /// parent level). None of them overlaps another, as a JetStream
    /// consumer requires.
    pub fn retained_filters(&self, filter: &str) -> Vec<String> {
        let mut base = format!("{}.ret", self.prefix);
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                // The parent level itself, unless `#` is the whole filter
                // (a topic has at least one level).
                let parent = (base.len() > self.prefix.len() + 4).then(|| base.clone());
                base.push_str(".>");
                return parent.into_iter().chain([base]).collect();
            }
            base.push('.');
            if level == "+" {
                base.push('*');
            } else {
                push_escaped(&mut base, level);
            }
        }
        vec![base]
    }

    /// The MQTT topic of a `tel` or `msg` subject: `fm.tel.3.d1.env.temp`
    /// → `devices/d1/env/temp`, `fm.msg.a.%.b` → `a//b`.
    pub fn mqtt_topic(&self, subject: &str) -> Result<String, TopicError> {
        let bad = |why| TopicError::BadSubject { subject: subject.to_owned(), why };
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| bad("wrong prefix"))?;
        if let Some(levels) = rest.strip_prefix("msg.").or_else(|| rest.strip_prefix("ret.")) {
            let mut topic = String::with_capacity(levels.len());
            for (i, token) in levels.split('.').enumerate() {
                if i > 0 {
                    topic.push('/');
                }
                topic.push_str(&unescape_token(token)?);
            }
            return Ok(topic);
        }
        let parsed = self.parse(subject)?;
        if parsed.family != Family::Telemetry {
            return Err(bad("not a telemetry or message subject"));
        }
        Ok(format!("{DEVICE_TOPIC_ROOT}/{}/{}", parsed.device, parsed.rest))
    }

    /// `{prefix}.ckpt.{shard}`: one shard's checkpoint log.
    pub fn checkpoint(&self, shard: u32) -> String {
        format!("{}.ckpt.{shard}", self.prefix)
    }

    /// `{prefix}.ckpt.>`: every shard's checkpoint log.
    pub fn checkpoint_filter(&self) -> String {
        format!("{}.ckpt.>", self.prefix)
    }

    /// The wildcard covering a whole family, e.g. `fm.tel.>`.
    pub fn family_filter(&self, family: Family) -> String {
        format!("{}.{}.>", self.prefix, family.token())
    }

    /// The wildcard covering one shard of a family, e.g. `fm.tel.12.>`.
    pub fn shard_filter(&self, family: Family, shard: u32) -> String {
        format!("{}.{}.{shard}.>", self.prefix, family.token())
    }

    /// `{prefix}.tel.{shard}.{device}.{channel...}`.
    pub fn telemetry(&self, shard: u32, topic: &DeviceTopic<'_>) -> String {
        let mut s = self.start(Family::Telemetry, shard, topic.device, topic.channel.len());
        push_channel_tokens(&mut s, topic.channel);
        s
    }

    /// `{prefix}.evt.{shard}.{device}.{kind}`.
    pub fn event(&self, shard: u32, device: &str, kind: &str) -> String {
        let mut s = self.start(Family::Event, shard, device, kind.len());
        push_escaped(&mut s, kind);
        s
    }

    fn start(&self, family: Family, shard: u32, device: &str, extra: usize) -> String {
        let mut s = String::with_capacity(self.prefix.len() + device.len() + extra + 20);
        // Writing to a String cannot fail.
        let _ = write!(s, "{}.{}.{shard}.", self.prefix, family.token());
        push_escaped(&mut s, device);
        s.push('.');
        s
    }

    /// The JSON mirror subject of a `tel` or `evt` subject:
    /// `fm.tel.3.d1.temp` → `fm.json.tel.3.d1.temp`.
    pub fn json_mirror(&self, subject: &str) -> Option<String> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        Some(format!("{}.json.{rest}", self.prefix))
    }

    /// The wildcard of the JSON mirror of a family, e.g. `fm.json.tel.>`.
    pub fn json_filter(&self, family: Family) -> String {
        format!("{}.json.{}.>", self.prefix, family.token())
    }

    /// `{prefix}.cmd.{device}`.
    pub fn command(&self, device: &str) -> String {
        format!("{}.cmd.{}", self.prefix, escape_token(device))
    }

    /// `{prefix}.cmdq.{shard}.{device}`: commands queued for `device`.
    pub fn command_queue(&self, shard: u32, device: &str) -> String {
        format!("{}.cmdq.{shard}.{}", self.prefix, escape_token(device))
    }

    /// `{prefix}.cmdq.>`: every queued command.
    pub fn command_queue_filter(&self) -> String {
        format!("{}.cmdq.>", self.prefix)
    }

    /// Takes a `tel` or `evt` subject apart, unescaping device and channel.
    pub fn parse(&self, subject: &str) -> Result<ParsedSubject, TopicError> {
        let bad = |why| TopicError::BadSubject { subject: subject.to_owned(), why };
        let mut tokens = subject.split('.');
        if tokens.next() != Some(self.prefix.as_str()) {
            return Err(bad("wrong prefix"));
        }
        let family = match tokens.next() {
            Some("tel") => Family::Telemetry,
            Some("evt") => Family::Event,
            _ => return Err(bad("unknown family")),
        };
        let shard = tokens.next().and_then(|t| t.parse::<u32>().ok()).ok_or_else(|| bad("shard is not a number"))?;
        let device = unescape_token(tokens.next().ok_or_else(|| bad("no device"))?)?;
        if device.is_empty() {
            return Err(bad("empty device"));
        }
        let mut any_channel = false;
        let mut rest = String::new();
        for (i, token) in tokens.enumerate() {
            if i > 0 {
                rest.push('/');
            }
            rest.push_str(&unescape_token(token)?);
            any_channel = true;
        }
        if !any_channel {
            return Err(bad("no channel"));
        }
        Ok(ParsedSubject { family, shard, device: device.into_owned(), rest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tokens_borrow() {
        assert!(matches!(escape_token("sensor-1"), Cow::Borrowed("sensor-1")));
        assert_eq!(escape_token("Ünïcødé"), "Ünïcødé");
    }

    #[test]
    fn specials_are_escaped() {
        assert_eq!(escape_token("a.b"), "a%2Eb");
        assert_eq!(escape_token("*"), "%2A");
        assert_eq!(escape_token(">"), "%3E");
        assert_eq!(escape_token("50%"), "50%25");
        assert_eq!(escape_token("a b\tc\n"), "a%20b%09c%0A");
        assert_eq!(escape_token("\u{a0}"), "%C2%A0");
        assert_eq!(escape_token(""), "%");
    }

    #[test]
    fn unescape_rejects_non_canonical() {
        assert!(unescape_token("%41").is_err(), "A need not be escaped");
        assert!(unescape_token("%2e").is_err(), "lower-case hex");
        assert!(unescape_token("%2").is_err());
        assert!(unescape_token("a.b").is_err());
        assert!(unescape_token("").is_err());
        assert!(unescape_token("%FF").is_err(), "not UTF-8");
        assert_eq!(unescape_token("%").as_deref(), Ok(""));
    }

    #[test]
    fn plain_topics_map_to_subjects_and_back() {
        let subjects = Subjects::new("fm").expect("prefix");
        for topic in ["TopicA", "/TopicA", "a//b", "a/b.c/ d", "sport/tennis/player1", "Ünï/%"] {
            let plain = PlainTopic::parse(topic).expect("valid plain topic");
            let subject = subjects.message(&plain);
            assert!(subject.starts_with("fm.msg."), "{subject}");
            assert_eq!(subjects.mqtt_topic(&subject).as_deref(), Ok(topic), "{subject}");
        }
        assert_eq!(subjects.message(&PlainTopic::parse("/a").expect("valid")), "fm.msg.%.a");
        assert_eq!(PlainTopic::parse(""), Err(TopicError::EmptyTopic));
        assert_eq!(PlainTopic::parse("devices"), Err(TopicError::NotDeviceTopic));
        assert_eq!(PlainTopic::parse("devices/x"), Err(TopicError::NotDeviceTopic));
        assert!(PlainTopic::parse("devicesX/x").is_ok());
        assert_eq!(PlainTopic::parse("$SYS/x"), Err(TopicError::Reserved));
        assert_eq!(PlainTopic::parse("a/+"), Err(TopicError::Wildcard));
        assert_eq!(PlainTopic::parse("a/\0"), Err(TopicError::NullCharacter));
        let t = DeviceTopic::parse("devices/d.1/env/t emp").expect("valid");
        let subject = subjects.telemetry(7, &t);
        assert_eq!(subjects.mqtt_topic(&subject).as_deref(), Ok("devices/d.1/env/t emp"));
        assert!(subjects.mqtt_topic("fm.evt.1.d.alert").is_err());
        assert_eq!(subjects.retained("devices/d 1/status"), "fm.ret.devices.d%201.status");
        assert_eq!(subjects.mqtt_topic("fm.ret.devices.d%201.status").as_deref(), Ok("devices/d 1/status"));
        assert_eq!(subjects.retained_filters("#"), ["fm.ret.>"]);
        assert_eq!(subjects.retained_filters("a/#"), ["fm.ret.a", "fm.ret.a.>"]);
        assert_eq!(subjects.retained_filters("+/b.c/+"), ["fm.ret.*.b%2Ec.*"]);
        assert_eq!(subjects.retained_filters("+/#"), ["fm.ret.*", "fm.ret.*.>"]);
        assert_eq!(subjects.retained_filters("/x"), ["fm.ret.%.x"]);
        let will = subjects.will("node-1", "abc", "cli.ent");
        assert_eq!(will, "fm.will.node-1.abc.cli%2Eent");
        assert_eq!(subjects.parse_will(&will), Ok(("node-1".into(), "abc".into(), "cli.ent".into())));
        assert!(subjects.parse_will("fm.will.a.b").is_err());
        assert!(subjects.parse_will("fm.ret.a.b.c").is_err());
        assert!(subjects.mqtt_topic("other.msg.a").is_err());
    }

    #[test]
    fn subjects_round_trip() {
        let s = Subjects::new("fm").expect("valid prefix");
        let topic = DeviceTopic::parse("devices/a.b c/x/>/*/%/").expect("valid");
        let subject = s.telemetry(7, &topic);
        assert_eq!(subject, "fm.tel.7.a%2Eb%20c.x.%3E.%2A.%25.%");
        let parsed = s.parse(&subject).expect("parses");
        assert_eq!(parsed.device, "a.b c");
        assert_eq!(parsed.rest, "x/>/*/%/");
        assert_eq!(s.json_mirror(&subject).as_deref(), Some("fm.json.tel.7.a%2Eb%20c.x.%3E.%2A.%25.%"));
        assert_eq!(s.telemetry_stream(2), "FM_TEL_2");
        assert_eq!(s.command_queue(7, "a.b"), "fm.cmdq.7.a%2Eb");
        assert_eq!(s.command_queue_filter(), "fm.cmdq.>");
        assert!(Subjects::new("a.b").is_err());
        assert!(Subjects::new("").is_err());
    }
}
