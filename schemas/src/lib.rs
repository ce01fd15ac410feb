//! The fluxmesh wire contract.
//!
//! Everything another program needs to talk to a fluxmesh mesh without
//! running our code lives here, and nothing here does I/O:
//!
//! - [`frame`]: the versioned rkyv [`Frame`] every event travels as, and
//!   validated zero-copy access to it from a buffer at any alignment.
//! - [`topic`]: MQTT device and plain topics, their limits, and why one is
//!   refused.
//! - [`subject`]: NATS subject names, and the reversible escaping that maps
//!   MQTT topic levels to subject tokens.
//! - [`shard`]: the documented shard function `fnv1a64(device) mod S`.
//! - [`headers`]: the NATS headers every published frame carries.
//! - [`json`]: the JSON view of a frame, for clients that do not speak rkyv.
//! - [`plugin_abi`]: what a WebAssembly plugin exports and what the host
//!   enforces.

pub mod frame;
pub mod headers;
pub mod json;
pub mod kv;
pub mod plugin_abi;
pub mod shard;
pub mod subject;
pub mod topic;

pub use frame::{Body, Frame, FrameError, FrameId, FrameView, Kind, SCHEMA_VERSION};
pub use shard::{partition_of, shard_of, DEFAULT_PARTITIONS, DEFAULT_SHARDS};
pub use subject::{DeviceTopic, PlainTopic, Subjects, TopicError};
