//! Shard checkpoints: one log per shard in stream `{PREFIX}_CKPT`, subject
//! `{prefix}.ckpt.{shard}`.
//!
//! A shard's progress is the stream sequence up to which every message of
//! the shard has been applied and its outputs stored (`covered`), with the
//! device states as of that sequence. The owner appends one [`Record`] per
//! checkpoint interval holding only the devices that changed, so
//! checkpoint writes per second grow with the number of shards, not of
//! devices. Replaying the log in order (later states replace earlier ones)
//! gives the shard's states; `covered` is the last record's. Every so often
//! the owner writes every device's state again (a snapshot, in records of at
//! most [`MAX_RECORD_BYTES`]) and purges what came before it, so a new
//! owner loads a shard with one read of a bounded log.
//!
//! **Fencing.** Every append carries `Nats-Expected-Last-Subject-Sequence`,
//! the log's last sequence as this writer knows it. A new owner first reads
//! the log and then appends a claim record (no states) at the sequence it
//! read: from then on an earlier owner's append fails, whatever its own
//! clock or its view of the leases says, so only one chain of checkpoints
//! ever becomes durable. A stale owner may still publish derived frames
//! (their ids are deterministic, so JetStream deduplicates them) and write
//! rows (idempotent keys); what it applied is never checkpointed.
//!
//! A record split into parts carries the previous `covered` in every part
//! but the last: a log cut short after some parts still covers only what
//! all its states have applied (each device's `last_stream_seq` skips the
//! messages a part's device had already applied).

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// Records larger than this are split (NATS's default max payload is 1 MiB).
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// The log of a shard is compacted into a snapshot once it holds this many
/// records since the last one, or more bytes than [`COMPACT_MIN_BYTES`] and
/// four times the last snapshot.
pub const COMPACT_RECORDS: u64 = 512;
pub const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Someone appended to the log since this writer last did: a newer
    /// owner claimed the shard.
    #[error("shard {shard}: the checkpoint log moved on (another owner claimed the shard)")]
    Fenced { shard: u32 },
    #[error("shard {shard}: cannot append to the checkpoint log")]
    Append {
        shard: u32,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("shard {shard}: cannot encode a checkpoint record")]
    Encode {
        shard: u32,
        #[source]
        source: serde_json::Error,
    },
    #[error("shard {shard}: cannot read the checkpoint log")]
    Read {
        shard: u32,
        #[source]
        source: crate::ReadError,
    },
    #[error("cannot open the checkpoint stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("shard {shard}: cannot compact the checkpoint log")]
    Purge {
        shard: u32,
        #[source]
        source: async_nats::Error,
    },
    #[error("shard {shard}: the checkpoint log kept moving while it was claimed")]
    ClaimRace { shard: u32 },
}

impl CheckpointError {
    /// The `reason` label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CheckpointError::Fenced { .. } => "fenced",
            CheckpointError::Append { .. } => "append",
            CheckpointError::Encode { .. } => "encode",
            CheckpointError::Read { .. } => "read",
            CheckpointError::Stream { .. } => "stream",
            CheckpointError::Purge { .. } => "purge",
            CheckpointError::ClaimRace { .. } => "claim_race",
        }
    }
}

/// One checkpoint record as stored (JSON). `states` maps device ids to
/// their state as the processing layer writes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record<K: std::hash::Hash + Eq, S> {
    /// Format version (1).
    pub v: u8,
    /// The writer: node id and lease epoch.
    pub node: String,
    pub epoch: u64,
    /// Telemetry stream sequence up to which the shard is applied.
    pub covered: u64,
    /// `claim`, `delta` or `snapshot`.
    pub kind: RecordKind,
    #[serde(default)]
    pub states: HashMap<K, S>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Claim,
    Delta,
    Snapshot,
}

/// What a shard's log says now.
#[derive(Debug, Default)]
pub struct Loaded {
    pub covered: u64,
    /// Each device's last state, as JSON.
    pub states: HashMap<String, serde_json::Value>,
    /// Records that could not be read (skipped, counted by the caller).
    pub unreadable: u64,
    /// The log's last sequence (0: empty).
    last: u64,
    records: u64,
    bytes: u64,
}

/// A writer's place in a shard's log: the sequence its next append expects.
#[derive(Debug)]
pub struct Fence {
    shard: u32,
    node: String,
    epoch: u64,
    last: u64,
    covered: u64,
    /// Since the last snapshot.
    records: u64,
    bytes: u64,
    snapshot_bytes: u64,
}

impl Fence {
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Whether the log has grown enough to be worth a snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.records >= COMPACT_RECORDS || self.bytes >= COMPACT_MIN_BYTES.max(self.snapshot_bytes * 4)
    }
}

/// The checkpoint logs of every shard. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    js: jetstream::Context,
    stream: String,
    subjects: fluxmesh_schemas::Subjects,
}

impl Checkpoints {
    pub fn new(js: jetstream::Context, subjects: fluxmesh_schemas::Subjects) -> Checkpoints {
        Checkpoints { stream: subjects.checkpoint_stream(), js, subjects }
    }

    /// The stream's config: file storage, `replicas`, nothing expires (a
    /// shard's log is bounded by its snapshots).
    pub fn stream_config(subjects: &fluxmesh_schemas::Subjects, replicas: usize) -> stream::Config {
        stream::Config {
            name: subjects.checkpoint_stream(),
            description: Some("fluxmesh shard checkpoints (one log per shard)".to_owned()),
            subjects: vec![subjects.checkpoint_filter()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            duplicate_window: Duration::from_secs(10),
            ..Default::default()
        }
    }

    /// Reads shard `shard`'s log: its states and `covered`.
    pub async fn load(&self, shard: u32) -> Result<Loaded, CheckpointError> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| CheckpointError::Stream { stream: self.stream.clone(), source: e.into() })?;
        // Read once and deleted: in memory on one server, not a replicated
        // consumer per claim.
        let config = jetstream::consumer::pull::Config {
            filter_subject: self.subjects.checkpoint(shard),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let mut loaded = Loaded::default();
        crate::read_pending(&stream, config, Duration::from_secs(10), |msg| {
            let seq = msg.info()?.stream_sequence;
            loaded.last = loaded.last.max(seq);
            loaded.records += 1;
            loaded.bytes += msg.payload.len() as u64;
            match serde_json::from_slice::<Record<String, serde_json::Value>>(&msg.payload) {
                Ok(record) => {
                    if record.kind == RecordKind::Snapshot {
                        loaded.records = 1;
                        loaded.bytes = msg.payload.len() as u64;
                    }
                    loaded.covered = loaded.covered.max(record.covered);
                    loaded.states.extend(record.states);
                }
                Err(e) => {
                    loaded.unreadable += 1;
                    tracing::warn!(shard, seq, error = %crate::error_chain(&e), "unreadable checkpoint record skipped");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| CheckpointError::Read { shard, source: e })?;
        Ok(loaded)
    }

    /// Reads the log and appends a claim record at the sequence read, so
    /// that every earlier writer is fenced off. Returns what was read and
    /// the fence for this owner's appends.
    pub async fn claim(&self, shard: u32, node: &str, epoch: u64) -> Result<(Loaded, Fence), CheckpointError> {
        for _ in 0..5 {
            let loaded = self.load(shard).await?;
            let mut fence = Fence {
                shard,
                node: node.to_owned(),
                epoch,
                last: loaded.last,
                covered: loaded.covered,
                records: loaded.records,
                bytes: loaded.bytes,
                snapshot_bytes: 0,
            };
            let claim: Record<&str, ()> = Record {
                v: 1,
                node: node.to_owned(),
                epoch,
                covered: loaded.covered,
                kind: RecordKind::Claim,
                states: HashMap::new(),
            };
            match self.write(&mut fence, &claim).await {
                Ok(()) => return Ok((loaded, fence)),
                // A previous owner's last append landed after our read:
                // read again, it belongs to the chain.
                Err(CheckpointError::Fenced { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(CheckpointError::ClaimRace { shard })
    }

    /// Appends the states of the devices that changed, now covering the
    /// telemetry up to `covered`. Fails with [`CheckpointError::Fenced`]
    /// once another owner has claimed the shard.
    pub async fn append<'a, S: Serialize + 'a>(
        &self,
        fence: &mut Fence,
        covered: u64,
        changed: impl IntoIterator<Item = (&'a str, &'a S)>,
    ) -> Result<(), CheckpointError> {
        self.write_states(fence, covered, RecordKind::Delta, changed).await
    }

    /// Writes every device's state again (a snapshot) and purges the log
    /// before it.
    pub async fn snapshot<'a, S: Serialize + 'a>(
        &self,
        fence: &mut Fence,
        all: impl IntoIterator<Item = (&'a str, &'a S)>,
    ) -> Result<(), CheckpointError> {
        let start = fence.last + 1;
        let before = fence.bytes;
        let covered = fence.covered;
        self.write_states(fence, covered, RecordKind::Snapshot, all).await?;
        let shard = fence.shard;
        let stream =
            self.js.get_stream(&self.stream).await.map_err(|e| CheckpointError::Purge { shard, source: e.into() })?;
        // The first part of the snapshot has a sequence of at least
        // `start`; everything before it is redundant now.
        stream
            .purge()
            .filter(self.subjects.checkpoint(shard))
            .sequence(start)
            .await
            .map_err(|e| CheckpointError::Purge { shard, source: e.into() })?;
        fence.snapshot_bytes = fence.bytes.saturating_sub(before);
        fence.bytes = fence.snapshot_bytes;
        fence.records = 1;
        Ok(())
    }

    async fn write_states<'a, S: Serialize + 'a>(
        &self,
        fence: &mut Fence,
        covered: u64,
        kind: RecordKind,
        states: impl IntoIterator<Item = (&'a str, &'a S)>,
    ) -> Result<(), CheckpointError> {
        let shard = fence.shard;
        let previous = fence.covered;
        // Each state is encoded once; the record carries it verbatim.
        let mut part: HashMap<&str, Box<serde_json::value::RawValue>> = HashMap::new();
        let mut size = 0usize;
        let mut parts = Vec::new();
        for (device, state) in states {
            let value =
                serde_json::value::to_raw_value(state).map_err(|e| CheckpointError::Encode { shard, source: e })?;
            // A close estimate: the encoded value plus the key and quotes.
            let len = device.len() + 4 + value.get().len();
            if size + len > MAX_RECORD_BYTES && !part.is_empty() {
                parts.push(std::mem::take(&mut part));
                size = 0;
            }
            size += len;
            part.insert(device, value);
        }
        parts.push(part);
        let n = parts.len();
        for (i, states) in parts.into_iter().enumerate() {
            // Only the last part moves `covered` (see the module docs).
            let covered = if i + 1 == n { covered } else { previous };
            let record = Record { v: 1, node: fence.node.clone(), epoch: fence.epoch, covered, kind, states };
            self.write(fence, &record).await?;
        }
        fence.covered = covered;
        Ok(())
    }

    async fn write<K: Serialize + std::hash::Hash + Eq, S: Serialize>(
        &self,
        fence: &mut Fence,
        record: &Record<K, S>,
    ) -> Result<(), CheckpointError> {
        let shard = fence.shard;
        let payload = serde_json::to_vec(record).map_err(|e| CheckpointError::Encode { shard, source: e })?;
        let len = payload.len() as u64;
        let publish = PublishMessage::build().payload(payload.into()).expected_last_subject_sequence(fence.last);
        let fenced = |e: jetstream::context::PublishError| match e.kind() {
            PublishErrorKind::WrongLastSequence => CheckpointError::Fenced { shard },
            _ => CheckpointError::Append { shard, source: e },
        };
        let ack = self.js.send_publish(self.subjects.checkpoint(shard), publish).await.map_err(fenced)?;
        let ack = ack.await.map_err(fenced)?;
        fence.last = ack.sequence;
        fence.records += 1;
        fence.bytes += len;
        Ok(())
    }
}
