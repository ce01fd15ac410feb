//! What happens to one device message on its shard's owner, apart from who
//! owns the shard: rules and plugins ([`pipeline`]), the device's state
//! ([`state`]) and its aggregation windows ([`aggregate`]). All of it is
//! synchronous and deterministic: the same messages in the same order, from
//! the same checkpoint, derive the same frames. The shard worker
//! (`crate::shards::worker`) runs it and stores what it derives.

pub mod aggregate;
pub mod pipeline;
pub mod state;
