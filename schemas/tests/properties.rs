//! Property tests for the wire contract: many generated inputs per run.

use fluxmesh_schemas::frame::{access, AlignedVec, Body, Frame, FrameId};
use fluxmesh_schemas::subject::{escape_token, unescape_token};
use fluxmesh_schemas::{DeviceTopic, Subjects};
use proptest::prelude::*;

/// Strings heavy in the characters that matter to subjects.
fn awkward() -> impl Strategy<Value = String> {
    prop_oneof![".*", "[.*>% \t\r\n/a-zA-Z0-9é✓\u{a0}\u{2028}\u{0}]{0,40}", "\\PC{0,64}",]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn escaping_round_trips_and_is_a_safe_token(raw in awkward()) {
        let token = escape_token(&raw);
        prop_assert!(!token.is_empty());
        prop_assert!(token != "*" && token != ">");
        prop_assert!(!token.contains(['.', '*', '>', ' ', '\t', '\r', '\n']));
        prop_assert!(!token.chars().any(|c| c.is_whitespace() || c.is_control()));
        prop_assert_eq!(unescape_token(&token).expect("own output unescapes"), raw.as_str());
    }

    #[test]
    fn unescape_never_panics(token in "\\PC{0,40}") {
        if let Ok(raw) = unescape_token(&token) {
            // Whatever it accepts is canonical: it escapes back to itself.
            prop_assert_eq!(escape_token(&raw), token.as_str());
        }
    }

    #[test]
    fn device_subjects_round_trip(device in awkward(), levels in proptest::collection::vec(awkward(), 1..5)) {
        let channel = levels.join("/");
        let topic_text = format!("devices/{device}/{channel}");
        let subjects = Subjects::new("fm").expect("prefix");
        if let Ok(topic) = DeviceTopic::parse(&topic_text) {
            let subject = subjects.telemetry(3, &topic);
            let parsed = subjects.parse(&subject).expect("own subject parses");
            prop_assert_eq!(parsed.device, topic.device);
            prop_assert_eq!(parsed.rest, topic.channel);
            prop_assert_eq!(subject.split('.').count(), 4 + topic.channel.split('/').count());
        }
    }

    #[test]
    fn frames_round_trip_at_any_offset(
        device in awkward(), channel in awkward(), payload in proptest::collection::vec(any::<u8>(), 0..2048),
        offset in 0usize..16, device_time in proptest::option::of(any::<i64>()),
    ) {
        let mut frame = Frame::telemetry(&device, &channel, "node-1", payload);
        frame.device_time_us = device_time;
        let bytes = frame.encode().expect("encodes");
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(&bytes);
        prop_assert_eq!(Frame::decode(&shifted[offset..]).expect("decodes"), frame);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut scratch = AlignedVec::new();
        let _ = access(&bytes, &mut scratch);
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn corrupted_frames_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let frame = Frame {
            id: FrameId([1; 16]),
            device: "d1".into(),
            channel: "env/temp".into(),
            device_time_us: Some(5),
            received_time_us: 6,
            origin: "n".into(),
            producer: String::new(),
            seq: 0,
            body: Body::Telemetry { payload: vec![9; 40] },
        };
        let mut bytes = frame.encode().expect("encodes");
        for (index, value) in flips {
            let i = index.index(bytes.len());
            bytes[i] ^= value;
        }
        // Either an error or a frame; never a panic or garbage access.
        if let Ok(decoded) = Frame::decode(&bytes) {
            let _ = fluxmesh_schemas::json::to_vec(access(&decoded.encode().expect("re-encodes"), &mut AlignedVec::new()).expect("valid"));
        }
    }
}
