//! The v1 [`Frame`]: the one type every telemetry message and derived event
//! travels as on the mesh.
//!
//! # Wire format
//!
//! A frame's NATS payload is the rkyv 0.8 archive of [`Frame`] in rkyv's
//! default format (little-endian, aligned, 32-bit relative pointers). The
//! schema version is not inside the archive but in the `Content-Type` header
//! ([`CONTENT_TYPE`]); a reader that sees another version must not read the
//! bytes as this type.
//!
//! # Alignment
//!
//! The archived root needs `align_of::<ArchivedFrame>()` (8) byte alignment,
//! and NATS hands payloads at arbitrary addresses. [`access`] reads in place
//! when the buffer happens to be aligned and otherwise copies it once into a
//! caller-owned scratch buffer (about 36 ns for 200 bytes on the reference
//! machine), then validates. Either way the frame is validated before use:
//! corrupt or truncated bytes are an error, never a panic.

use rkyv::rancor;
pub use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use std::fmt;

/// The frame schema version this crate reads and writes.
pub const SCHEMA_VERSION: u16 = 1;

/// The `Content-Type` header value of a v1 frame.
pub const CONTENT_TYPE: &str = "application/x-fluxmesh-frame+rkyv; v=1";

/// Why a frame could not be encoded or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame bytes are not a valid v1 frame")]
    Invalid(#[source] rancor::Error),
    #[error("frame could not be encoded")]
    Encode(#[source] rancor::Error),
    #[error("invalid frame id `{id}`: expected 32 hex digits")]
    BadId { id: String },
}

/// A frame's unique id, also its JetStream dedupe key (`Nats-Msg-Id`).
///
/// Telemetry ids are UUIDv7 (time-ordered, random tail); ids of derived
/// frames are computed from their input frame and producer so that a replay
/// yields the same id.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct FrameId(pub [u8; 16]);

impl FrameId {
    /// A new time-ordered id (UUIDv7).
    pub fn new_v7() -> Self {
        FrameId(uuid::Uuid::now_v7().into_bytes())
    }

    /// A deterministic id for `key` (UUIDv5 in a fluxmesh namespace), used
    /// for ids that must come out the same when the same input is replayed,
    /// such as an HTTP `Idempotency-Key`.
    pub fn from_key(key: &[u8]) -> Self {
        const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1f_0e2c_55d4_4f7e_9b1e_8f3c_2d4a_7b10);
        FrameId(uuid::Uuid::new_v5(&NAMESPACE, key).into_bytes())
    }

    /// Parses the 32-digit lower- or upper-case hex form.
    pub fn parse_hex(s: &str) -> Result<Self, FrameError> {
        let bad = || FrameError::BadId { id: s.to_owned() };
        if s.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(FrameId(out))
    }
}

impl fmt::Display for FrameId {
    /// 32 lower-case hex digits: the `Nats-Msg-Id` and JSON form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameId({self})")
    }
}

impl fmt::Display for ArchivedFrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&FrameId(self.0), f)
    }
}

/// What a frame is; the variant of its [`Body`]. Names the `evt` subject's
/// last token and the `Fm-Kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Telemetry,
    State,
    Alert,
    Aggregate,
    Event,
    Error,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Telemetry, Kind::State, Kind::Alert, Kind::Aggregate, Kind::Event, Kind::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::State => "state",
            Kind::Alert => "alert",
            Kind::Aggregate => "agg",
            Kind::Event => "event",
            Kind::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Alert severities, lowest first.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// One closed aggregation window of one numeric field.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Aggregate {
    pub field: String,
    pub window_start_us: i64,
    pub window_end_us: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Population variance (Welford).
    pub variance: f64,
}

/// The body of a frame; its variant is the frame's [`Kind`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum Body {
    /// The device's payload, byte for byte as it was sent.
    Telemetry { payload: Vec<u8> },
    /// The device's state after a change, as a JSON document.
    State { json: Vec<u8> },
    /// An alert raised by a rule or plugin; `json` carries extra fields.
    Alert { severity: Severity, message: String, json: Vec<u8> },
    /// A closed aggregation window.
    Aggregate(Aggregate),
    /// Any other output of a rule or plugin, as a JSON document.
    Event { json: Vec<u8> },
    /// A rule or plugin failed on an input; the input's id is in `message`.
    Error { message: String },
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::Telemetry { .. } => Kind::Telemetry,
            Body::State { .. } => Kind::State,
            Body::Alert { .. } => Kind::Alert,
            Body::Aggregate(_) => Kind::Aggregate,
            Body::Event { .. } => Kind::Event,
            Body::Error { .. } => Kind::Error,
        }
    }
}

impl ArchivedBody {
    pub fn kind(&self) -> Kind {
        match self {
            ArchivedBody::Telemetry { .. } => Kind::Telemetry,
            ArchivedBody::State { .. } => Kind::State,
            ArchivedBody::Alert { .. } => Kind::Alert,
            ArchivedBody::Aggregate(_) => Kind::Aggregate,
            ArchivedBody::Event { .. } => Kind::Event,
            ArchivedBody::Error { .. } => Kind::Error,
        }
    }
}

/// A v1 frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Frame {
    /// Unique id and dedupe key.
    pub id: FrameId,
    /// The device id, unescaped.
    pub device: String,
    /// The channel: MQTT topic levels after the device id, joined by `/`
    /// (for derived frames, the channel of the input, if any).
    pub channel: String,
    /// When the device says the reading was taken, if it said (µs since the
    /// Unix epoch).
    pub device_time_us: Option<i64>,
    /// When the mesh received it (µs since the Unix epoch).
    pub received_time_us: i64,
    /// The node that received (telemetry) or produced (derived) the frame.
    pub origin: String,
    /// Who made a derived frame (`rule:{id}`, `plugin:{id}`, `agg`, `state`);
    /// empty for telemetry.
    pub producer: String,
    /// Per-device sequence number of derived frames (gap detection); 0 for
    /// telemetry.
    pub seq: u64,
    pub body: Body,
}

impl Frame {
    /// A telemetry frame received now.
    pub fn telemetry(device: &str, channel: &str, origin: &str, payload: Vec<u8>) -> Frame {
        Frame {
            id: FrameId::new_v7(),
            device: device.to_owned(),
            channel: channel.to_owned(),
            device_time_us: None,
            received_time_us: now_us(),
            origin: origin.to_owned(),
            producer: String::new(),
            seq: 0,
            body: Body::Telemetry { payload },
        }
    }

    pub fn kind(&self) -> Kind {
        self.body.kind()
    }

    /// Encodes the frame into a new buffer (not necessarily aligned; readers
    /// go through [`access`]).
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let capacity = 128 + self.device.len() + self.channel.len() + self.origin.len() + self.body_len();
        rkyv::api::high::to_bytes_in::<_, rancor::Error>(self, Vec::with_capacity(capacity)).map_err(FrameError::Encode)
    }

    fn body_len(&self) -> usize {
        match &self.body {
            Body::Telemetry { payload } => payload.len(),
            Body::State { json } | Body::Event { json } => json.len(),
            Body::Alert { message, json, .. } => message.len() + json.len(),
            Body::Aggregate(a) => a.field.len() + 64,
            Body::Error { message } => message.len(),
        }
    }

    /// Validates `bytes` and deserializes an owned frame.
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut scratch = AlignedVec::new();
        let archived = access(bytes, &mut scratch)?;
        rkyv::deserialize::<Frame, rancor::Error>(archived).map_err(FrameError::Invalid)
    }
}

impl ArchivedFrame {
    pub fn kind(&self) -> Kind {
        self.body.kind()
    }

    pub fn device_time_us(&self) -> Option<i64> {
        self.device_time_us.as_ref().map(|t| t.to_native())
    }
}

/// Validated, zero-copy access to a frame in `bytes` at any alignment.
///
/// Reads in place when `bytes` is suitably aligned; otherwise copies it into
/// `scratch` (reuse one scratch buffer per task to avoid allocating) and
/// reads from there.
pub fn access<'b>(bytes: &'b [u8], scratch: &'b mut AlignedVec) -> Result<&'b ArchivedFrame, FrameError> {
    let aligned = bytes.as_ptr().align_offset(std::mem::align_of::<ArchivedFrame>()) == 0;
    let buf: &'b [u8] = if aligned {
        bytes
    } else {
        scratch.clear();
        scratch.extend_from_slice(bytes);
        scratch.as_slice()
    };
    rkyv::access::<ArchivedFrame, rancor::Error>(buf).map_err(FrameError::Invalid)
}

/// Owns a frame's bytes and gives validated access to it; for callers that
/// want to keep a frame rather than read it once.
#[derive(Debug)]
pub struct FrameView {
    bytes: AlignedVec,
}

impl FrameView {
    /// Copies `bytes` into an aligned buffer and validates it.
    pub fn new(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut aligned = AlignedVec::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::access::<ArchivedFrame, rancor::Error>(&aligned).map_err(FrameError::Invalid)?;
        Ok(FrameView { bytes: aligned })
    }

    /// The frame. Validation already passed in [`FrameView::new`]; this
    /// validates again (about 25 ns) rather than use `unsafe`.
    pub fn get(&self) -> &ArchivedFrame {
        match rkyv::access::<ArchivedFrame, rancor::Error>(&self.bytes) {
            Ok(frame) => frame,
            // The bytes are immutable and were valid in `new`.
            Err(e) => unreachable!("validated frame became invalid: {e}"),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: Vec<u8>) -> Frame {
        let mut frame = Frame::telemetry("dev.1 ✓", "env/temp", "node-1", payload);
        // Fixed, so that the truncation test reads the same bytes every run.
        frame.id = FrameId([0x5a; 16]);
        frame.received_time_us = 1_763_000_000_000_000;
        frame
    }

    #[test]
    fn round_trips_at_every_alignment() {
        let frame = sample(b"{\"t\":21.5}".to_vec());
        let bytes = frame.encode().expect("encodes");
        let mut scratch = AlignedVec::new();
        for offset in 0..16 {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(&bytes);
            let archived = access(&shifted[offset..], &mut scratch).expect("valid at any alignment");
            assert_eq!(archived.device.as_str(), "dev.1 ✓");
            assert_eq!(archived.kind(), Kind::Telemetry);
            assert_eq!(Frame::decode(&shifted[offset..]).expect("decodes"), frame);
        }
    }

    #[test]
    fn frame_id_hex_round_trip() {
        let id = FrameId::new_v7();
        assert_eq!(FrameId::parse_hex(&id.to_string()).expect("parses"), id);
        assert!(FrameId::parse_hex("xyz").is_err());
        assert!(FrameId::parse_hex(&"g".repeat(32)).is_err());
        assert_eq!(FrameId::from_key(b"k"), FrameId::from_key(b"k"));
        assert_ne!(FrameId::from_key(b"k"), FrameId::from_key(b"l"));
    }

    #[test]
    fn corrupt_bytes_are_errors() {
        let bytes = sample(vec![7; 100]).encode().expect("encodes");
        for len in 0..bytes.len() {
            // Truncation must be an error, never a panic; a prefix of a
            // valid frame is never itself a valid frame here.
            assert!(Frame::decode(&bytes[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        assert!(FrameView::new(&[0xff; 64]).is_err());
    }
}
