//! Per-device state kept by a shard's owner.
//!
//! Applying a telemetry message updates the device's counters and the last
//! value of its channel. A `state` frame is derived when a last value has
//! changed (a new channel, or a payload different from the previous one on
//! that channel) since the last state frame, and the message was received
//! at least `min_interval_us` after the message that derived the last one.
//! A change inside the interval is carried by the next frame: the frame is
//! a snapshot of the whole state. The device's `seq` goes up by one per
//! frame, so a subscriber that sees `seq` jump knows it missed one.
//!
//! Applying is deterministic: the same messages in the same order, from the
//! same checkpoint, give the same states and the same frames (ids
//! included), because every decision uses the messages' own times and
//! never the clock. That is what makes a replay after failover harmless.

use super::aggregate::Windows;
use base64::Engine as _;
use fluxmesh_schemas::frame::{ArchivedBody, ArchivedFrame};
use fluxmesh_schemas::{Body, Frame, FrameId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The producer name on derived state frames.
pub const PRODUCER: &str = "state";

/// One device's state, as checkpointed and as served by the HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceState {
    pub device: String,
    /// State frames derived so far; the `seq` of the last one.
    pub seq: u64,
    /// Telemetry messages applied.
    pub count: u64,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    /// Stream sequence of the last telemetry message applied: anything at
    /// or below it is a redelivery and is skipped.
    pub last_stream_seq: u64,
    /// Last value per channel.
    pub channels: BTreeMap<String, ChannelValue>,
    /// A last value changed since the last state frame.
    #[serde(default)]
    pub unsent_change: bool,
    /// `received_time_us` of the message that derived the last state frame.
    #[serde(default)]
    pub last_frame_us: i64,
    /// Variables rules set with `set_state`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, Value>,
    /// Messages a rule dropped (not counted, not aggregated).
    #[serde(default)]
    pub dropped: u64,
    /// Per-kind sequence numbers of derived frames other than `state`
    /// (whose sequence is `seq`): each `{prefix}.evt.{shard}.{device}.{kind}`
    /// subject carries 1, 2, 3, …
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seqs: BTreeMap<String, u64>,
    /// Open aggregation windows.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub windows: Windows,
}

/// A channel's last value: the payload as JSON if it is JSON, else base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    pub received_time_us: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_time_us: Option<i64>,
}

impl ChannelValue {
    fn same_value(&self, other: &ChannelValue) -> bool {
        self.value == other.value && self.value_base64 == other.value_base64
    }
}

/// What applying one message did.
#[derive(Debug, PartialEq)]
pub enum Applied {
    /// Already applied before (stream sequence at or below the last one).
    Skipped,
    /// Counted; the last value did not change.
    Counted,
    /// The last value changed: here is the derived state frame.
    Changed(Box<Frame>),
}

impl DeviceState {
    pub fn new(device: &str) -> Self {
        DeviceState { device: device.to_owned(), ..Default::default() }
    }

    /// The message at `stream_seq` was applied (or dropped) already.
    pub fn is_redelivery(&self, stream_seq: u64) -> bool {
        stream_seq <= self.last_stream_seq
    }

    /// The next sequence number of derived frames of `kind`.
    pub fn next_seq(&mut self, kind: fluxmesh_schemas::frame::Kind) -> u64 {
        if kind == fluxmesh_schemas::frame::Kind::State {
            self.seq += 1;
            return self.seq;
        }
        let seq = self.seqs.entry(kind.as_str().to_owned()).or_insert(0);
        *seq += 1;
        *seq
    }

    /// Applies the telemetry message at `stream_seq`, whose payload parsed
    /// as `json` (if it is JSON). Non-telemetry frames are counted but carry
    /// no channel value.
    pub fn apply(
        &mut self,
        frame: &ArchivedFrame,
        stream_seq: u64,
        origin: &str,
        min_interval_us: i64,
        json: Option<&Value>,
    ) -> Applied {
        if self.is_redelivery(stream_seq) {
            return Applied::Skipped;
        }
        self.last_stream_seq = stream_seq;
        let received = frame.received_time_us.to_native();
        if self.count == 0 {
            self.first_seen_us = received;
        }
        self.count += 1;
        self.last_seen_us = self.last_seen_us.max(received);
        let ArchivedBody::Telemetry { payload } = &frame.body else { return Applied::Counted };
        let new = match json {
            Some(v) => ChannelValue {
                value: Some(v.clone()),
                value_base64: None,
                received_time_us: received,
                device_time_us: frame.device_time_us(),
            },
            None => ChannelValue {
                value: None,
                value_base64: Some(base64::engine::general_purpose::STANDARD.encode(payload.as_slice())),
                received_time_us: received,
                device_time_us: frame.device_time_us(),
            },
        };
        let channel = frame.channel.as_str();
        let changed = self.channels.get(channel).is_none_or(|old| !old.same_value(&new));
        match self.channels.get_mut(channel) {
            Some(slot) => *slot = new,
            None => {
                self.channels.insert(channel.to_owned(), new);
            }
        }
        self.unsent_change |= changed;
        let due = self.seq == 0 || received.saturating_sub(self.last_frame_us) >= min_interval_us;
        if !(self.unsent_change && due) {
            return Applied::Counted;
        }
        self.unsent_change = false;
        self.last_frame_us = received;
        let seq = self.next_seq(fluxmesh_schemas::frame::Kind::State);
        let mut key = Vec::with_capacity(16 + PRODUCER.len());
        key.extend_from_slice(&frame.id.0);
        key.extend_from_slice(PRODUCER.as_bytes());
        // The frame shows the state without the aggregation internals.
        let mut view = serde_json::to_value(&*self).unwrap_or_default();
        if let Some(map) = view.as_object_mut() {
            map.remove("windows");
        }
        let json = serde_json::to_vec(&view).unwrap_or_default();
        Applied::Changed(Box::new(Frame {
            id: FrameId::from_key(&key),
            device: self.device.clone(),
            channel: channel.to_owned(),
            device_time_us: frame.device_time_us(),
            received_time_us: received,
            origin: origin.to_owned(),
            producer: PRODUCER.to_owned(),
            seq,
            body: Body::State { json },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxmesh_schemas::frame::{access, AlignedVec};

    fn apply(state: &mut DeviceState, frame: &Frame, seq: u64) -> Applied {
        let bytes = frame.encode().expect("encode");
        let mut scratch = AlignedVec::new();
        let archived = access(&bytes, &mut scratch).expect("access");
        let json = json_of(archived);
        state.apply(archived, seq, "node-1", 0, json.as_ref())
    }

    fn json_of(frame: &ArchivedFrame) -> Option<Value> {
        match &frame.body {
            ArchivedBody::Telemetry { payload } => serde_json::from_slice(payload).ok(),
            _ => None,
        }
    }

    #[test]
    fn a_changed_value_derives_a_state_frame_with_the_next_seq() {
        let mut s = DeviceState::new("d1");
        let a = Frame::telemetry("d1", "temp", "n", br#"{"c":21.5}"#.to_vec());
        let Applied::Changed(f) = apply(&mut s, &a, 10) else { panic!("first value is a change") };
        assert_eq!((f.seq, f.producer.as_str(), f.channel.as_str()), (1, PRODUCER, "temp"));
        // Same value again: counted, no frame.
        let b = Frame::telemetry("d1", "temp", "n", br#"{"c":21.5}"#.to_vec());
        assert_eq!(apply(&mut s, &b, 11), Applied::Counted);
        // A redelivery of something already applied is skipped.
        assert_eq!(apply(&mut s, &a, 10), Applied::Skipped);
        let c = Frame::telemetry("d1", "temp", "n", vec![0xff, 0x00]);
        let Applied::Changed(f) = apply(&mut s, &c, 12) else { panic!("new value") };
        assert_eq!(f.seq, 2);
        assert_eq!(s.count, 3);
        assert_eq!(s.channels["temp"].value_base64.as_deref(), Some("/wA="));
    }

    #[test]
    fn changes_inside_the_interval_ride_on_the_next_frame() {
        let mut s = DeviceState::new("d");
        let at = |t: i64, v: &str| {
            let mut f = Frame::telemetry("d", "x", "n", v.as_bytes().to_vec());
            f.received_time_us = t;
            f
        };
        let mut run = |f: Frame, seq: u64| {
            let bytes = f.encode().expect("encode");
            let mut scratch = AlignedVec::new();
            let frame = access(&bytes, &mut scratch).expect("access");
            s.apply(frame, seq, "n", 1_000_000, json_of(frame).as_ref())
        };
        assert!(matches!(run(at(0, "1"), 1), Applied::Changed(_)), "the first value always derives a frame");
        assert_eq!(run(at(500_000, "2"), 2), Applied::Counted, "inside the interval");
        assert_eq!(run(at(900_000, "2"), 3), Applied::Counted);
        let Applied::Changed(f) = run(at(1_000_000, "2"), 4) else { panic!("the pending change is due") };
        assert_eq!(f.seq, 2);
        assert_eq!(run(at(2_500_000, "2"), 5), Applied::Counted, "due, but nothing changed");
    }

    #[test]
    fn replaying_the_same_input_gives_the_same_frame_ids() {
        let inputs: Vec<Frame> =
            (0..20).map(|i| Frame::telemetry("d", "x", "n", format!("{}", i % 3).into_bytes())).collect();
        let run = || {
            let mut s = DeviceState::new("d");
            let ids: Vec<_> = inputs
                .iter()
                .enumerate()
                .filter_map(|(i, f)| match apply(&mut s, f, i as u64 + 1) {
                    Applied::Changed(f) => Some((f.id, f.seq)),
                    _ => None,
                })
                .collect();
            (ids, s)
        };
        assert_eq!(run(), run());
    }
}
