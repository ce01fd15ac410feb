//! `--verify`: after the run, read the telemetry streams back and compare
//! them with what the devices saw PUBACKed (nothing acknowledged missing,
//! nothing stored twice); with `--verify-processing`, also check what the
//! shard workers made of it (every stored message applied once, every
//! state frame derived once). The results are printed as `verify:` lines
//! and carried into the JSON report under the same names.

use crate::args::Args;
use crate::devices::payload_meta;
use crate::report::TextOut;
use crate::streams::{for_each_frame_since, wait_until_replicas_current, wait_until_stored_settles};
use anyhow::Context as _;
use fluxmesh_schemas::{shard_of, Subjects};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Each device's id and the sequence numbers of its PUBACKed messages.
pub type AckedByDevice = Vec<(String, Arc<Mutex<Vec<u64>>>)>;

/// The telemetry streams against the PUBACKs (`verify` in the JSON report).
#[derive(Debug, Serialize)]
pub struct Verified {
    /// Messages the devices saw PUBACKed.
    pub acked: u64,
    /// Distinct messages of the run in the telemetry streams.
    pub stored: u64,
    /// PUBACKed but not stored: lost.
    pub acked_but_missing: u64,
    /// Stored more than once (a QoS1 resend).
    pub stored_twice: u64,
    /// Up to 10 of the missing ones, `{device}#{seq}`.
    pub missing_examples: Vec<String>,
}

/// What the shard workers made of the stored messages
/// (`verify_processing` in the JSON report).
#[derive(Debug, Serialize)]
pub struct ProcessingVerified {
    /// Devices that had messages stored.
    pub devices: u64,
    /// Devices whose checkpointed state applied fewer messages than stored.
    pub applied_behind: u64,
    /// Devices whose checkpointed state applied more messages than stored.
    pub applied_twice: u64,
    /// State frames of the run's devices in the event stream.
    pub state_frames: u64,
    /// State frames with a seq seen before.
    pub duplicate_state_frames: u64,
    /// Seqs in 1..n (n: the device state's seq) with no state frame.
    pub missing_state_frames: u64,
}

impl Verified {
    fn print(&self, out: TextOut) {
        if !self.missing_examples.is_empty() {
            out.line(format_args!("verify: acknowledged but not stored, e.g. {}", self.missing_examples.join(" ")));
        }
        out.line(format_args!(
            "verify: acked={} stored={} acked_but_missing={} stored_twice={}",
            self.acked, self.stored, self.acked_but_missing, self.stored_twice
        ));
    }
}

impl ProcessingVerified {
    fn print(&self, out: TextOut) {
        out.line(format_args!(
            "verify_processing: devices={} applied_behind={} applied_twice={} state_frames={} duplicate_state_frames={} missing_state_frames={}",
            self.devices,
            self.applied_behind,
            self.applied_twice,
            self.state_frames,
            self.duplicate_state_frames,
            self.missing_state_frames
        ));
    }
}

/// [`verify_once`], retried for up to a minute: reading a stream right
/// after a fault can fail (a consumer placed on a server that is
/// restarting, a stream still electing its leader after a partition).
///
/// A read that finds a violation (an acknowledged message missing, a
/// message applied more often than stored) is read once more, 5 s later,
/// and both reads are printed: a read taken while a healed server catches
/// up can miss what is stored. The verdict is the second read's; a real
/// loss is missing from both.
pub async fn verify(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
    out: TextOut,
) -> anyhow::Result<(Verified, Option<ProcessingVerified>)> {
    let first = verify_retrying(nats, args, since, acked_by_device, out).await?;
    let violated = |(v, p): &(Verified, Option<ProcessingVerified>)| {
        v.acked_but_missing > 0 || p.as_ref().is_some_and(|p| p.applied_twice > 0 || p.applied_behind > 0)
    };
    if !violated(&first) {
        return Ok(first);
    }
    eprintln!("verify: the first read found a violation (above); reading again in 5 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    verify_retrying(nats, args, since, acked_by_device, out).await
}

async fn verify_retrying(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
    out: TextOut,
) -> anyhow::Result<(Verified, Option<ProcessingVerified>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 1;
    loop {
        match verify_once(nats, args, since, acked_by_device, out).await {
            Ok(verified) => return Ok(verified),
            Err(e) if Instant::now() < deadline => {
                eprintln!("verify: attempt {attempt} failed ({e:#}); reading again");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the stream from the run's start and reports PUBACKed messages
/// that are not in it, and messages stored more than once; with
/// `--verify-processing`, also what the shard workers made of them.
async fn verify_once(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
    out: TextOut,
) -> anyhow::Result<(Verified, Option<ProcessingVerified>)> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut stored: HashMap<String, HashSet<u64>> = HashMap::new();
    // Every stored copy counts for processing: a resent QoS1 message stored
    // twice is two messages to the shard worker.
    let mut stored_copies: HashMap<String, u64> = HashMap::new();
    let mut duplicates = 0u64;
    let prefix = format!("{}-", args.prefix);
    let streams = match &args.stream {
        Some(s) => vec![s.clone()],
        None => fluxmesh_mesh::telemetry_streams(&js, &Subjects::new(&args.subject_prefix)?)
            .await
            .context("finding the telemetry streams")?,
    };
    wait_until_stored_settles(&js, &streams).await?;
    wait_until_replicas_current(&js, &streams).await;
    for stream in &streams {
        for_each_frame_since(&js, stream, since, |frame| {
            if !frame.device.as_str().starts_with(&prefix) {
                return;
            }
            if let fluxmesh_schemas::frame::ArchivedBody::Telemetry { payload } = &frame.body {
                if let Some((_, seq)) = payload_meta(payload) {
                    *stored_copies.entry(frame.device.as_str().to_owned()).or_default() += 1;
                    if !stored.entry(frame.device.as_str().to_owned()).or_default().insert(seq) {
                        duplicates += 1;
                    }
                }
            }
        })
        .await
        .with_context(|| format!("reading telemetry stream {stream}"))?;
    }
    let (mut acked, mut lost) = (0u64, 0u64);
    let mut examples = Vec::new();
    for (device, seqs) in acked_by_device {
        let seqs = seqs.lock().map(|s| s.clone()).unwrap_or_default();
        let have = stored.get(device);
        acked += seqs.len() as u64;
        for s in seqs.iter().filter(|s| !have.is_some_and(|h| h.contains(s))) {
            lost += 1;
            if examples.len() < 10 {
                examples.push(format!("{device}#{s}"));
            }
        }
    }
    let stored_total = stored.values().map(HashSet::len).sum::<usize>() as u64;
    let verified = Verified {
        acked,
        stored: stored_total,
        acked_but_missing: lost,
        stored_twice: duplicates,
        missing_examples: examples,
    };
    verified.print(out);
    let processing = if args.verify_processing {
        let processing = verify_processing(&js, args, since, &stored_copies).await?;
        processing.print(out);
        Some(processing)
    } else {
        None
    };
    Ok((verified, processing))
}

/// Waits (up to 60 s) until every device's checkpointed state has applied
/// as many messages as were stored for it, then checks the derived state
/// frames: one per seq, seq 1..n with n the state's seq.
async fn verify_processing(
    js: &async_nats::jetstream::Context,
    args: &Args,
    since: SystemTime,
    stored: &HashMap<String, u64>,
) -> anyhow::Result<ProcessingVerified> {
    let subjects = Subjects::new(&args.subject_prefix)?;
    let event_stream = subjects.event_stream();
    let checkpoints = fluxmesh_mesh::checkpoint::Checkpoints::new(js.clone(), subjects);
    let shards: BTreeSet<u32> = stored.keys().map(|d| shard_of(d, args.shards)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut states, mut behind, mut over);
    loop {
        states = HashMap::new();
        (behind, over) = (0u64, 0u64);
        let mut checkpointed: HashMap<String, serde_json::Value> = HashMap::new();
        for shard in &shards {
            checkpointed.extend(checkpoints.load(*shard).await.context("reading a checkpoint log")?.states);
        }
        for (device, count) in stored {
            let state = checkpointed.remove(device);
            let applied = state.as_ref().and_then(|s| s["count"].as_u64()).unwrap_or(0);
            match applied.cmp(count) {
                std::cmp::Ordering::Less => behind += 1,
                std::cmp::Ordering::Greater => over += 1,
                std::cmp::Ordering::Equal => {}
            }
            if let Some(s) = state {
                states.insert(device.clone(), s["seq"].as_u64().unwrap_or(0));
            }
        }
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seqs: HashMap<String, HashSet<u64>> = HashMap::new();
    let (mut frames, mut dup_frames) = (0u64, 0u64);
    for_each_frame_since(js, &event_stream, since, |frame| {
        if !stored.contains_key(frame.device.as_str()) || frame.producer.as_str() != "state" {
            return;
        }
        frames += 1;
        if !seqs.entry(frame.device.as_str().to_owned()).or_default().insert(frame.seq.to_native()) {
            dup_frames += 1;
        }
    })
    .await
    .context("reading the event stream")?;
    let mut gaps = 0u64;
    for (device, n) in &states {
        let have = seqs.get(device).map_or(0, |s| s.iter().filter(|q| (1..=*n).contains(*q)).count() as u64);
        gaps += n - have.min(*n);
    }
    Ok(ProcessingVerified {
        devices: stored.len() as u64,
        applied_behind: behind,
        applied_twice: over,
        state_frames: frames,
        duplicate_state_frames: dup_frames,
        missing_state_frames: gaps,
    })
}
