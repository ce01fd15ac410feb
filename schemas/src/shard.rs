//! The shard function.
//!
//! `shard = fnv1a64(utf8(device_id)) mod S`
//!
//! FNV-1a 64 is used because it is fully specified in a few lines (offset
//! basis `0xcbf29ce484222325`, prime `0x100000001b3`, xor each byte then
//! multiply, wrapping), so any outside publisher in any language can compute
//! the shard of a device and publish straight to its subject. The input is
//! the raw device id (before subject escaping). `S` is fixed per cluster and
//! stored in the cluster's KV config; changing it re-shards every device.

/// The default number of shards in a cluster.
pub const DEFAULT_SHARDS: u32 = 64;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64-bit, over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME))
}

/// The default number of telemetry partitions (streams) in a cluster.
pub const DEFAULT_PARTITIONS: u32 = 3;

/// The telemetry partition (stream `{PREFIX}_TEL_{p}`) that holds `shard`:
/// partitions hold contiguous ranges of shards, `shard × P / S`, so that
/// with S = 64 and P = 3 they hold shards 0-21, 22-42 and 43-63.
pub fn partition_of(shard: u32, shards: u32, partitions: u32) -> u32 {
    let (shards, partitions) = (u64::from(shards.max(1)), u64::from(partitions.max(1)));
    u32::try_from(u64::from(shard) * partitions / shards).unwrap_or(0)
}

/// The shards partition `partition` holds.
pub fn partition_shards(partition: u32, shards: u32, partitions: u32) -> std::ops::Range<u32> {
    // The first shard of partition p is the least s with s × P / S ≥ p,
    // that is ⌈p × S / P⌉.
    let (s, p) = (u64::from(shards), u64::from(partitions.max(1)));
    let first = |q: u64| u32::try_from((q * s).div_ceil(p).min(s)).unwrap_or(shards);
    first(u64::from(partition))..first(u64::from(partition) + 1)
}

/// The shard that owns `device` in a cluster of `shards` shards.
///
/// # Panics
/// Never: a `shards` of 0 is treated as 1 (every device in shard 0); config
/// validation rejects 0 before it gets here.
pub fn shard_of(device: &str, shards: u32) -> u32 {
    let shards = u64::from(shards.max(1));
    // The remainder is < shards <= u32::MAX, so the conversion cannot fail.
    u32::try_from(fnv1a64(device.as_bytes()) % shards).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_hold_contiguous_ranges_covering_every_shard() {
        assert_eq!(partition_shards(0, 64, 3), 0..22);
        assert_eq!(partition_shards(1, 64, 3), 22..43);
        assert_eq!(partition_shards(2, 64, 3), 43..64);
        for (shards, partitions) in [(64, 1), (64, 3), (64, 64), (7, 5), (1000, 7)] {
            let mut next = 0;
            for p in 0..partitions {
                let range = partition_shards(p, shards, partitions);
                assert_eq!(range.start, next, "S={shards} P={partitions} p={p}");
                assert!(!range.is_empty(), "S={shards} P={partitions} p={p}");
                assert!(range.clone().all(|s| partition_of(s, shards, partitions) == p));
                next = range.end;
            }
            assert_eq!(next, shards);
        }
    }

    /// Published FNV-1a 64 test vectors, so the function is the named one.
    #[test]
    fn matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn shard_is_stable_and_in_range() {
        // Pinned values: changing them re-shards every deployed device.
        assert_eq!(shard_of("sensor-1", 64), (fnv1a64(b"sensor-1") % 64) as u32);
        assert_eq!(shard_of("a", 64), (0xaf63dc4c8601ec8cu64 % 64) as u32);
        for i in 0..1000 {
            assert!(shard_of(&format!("dev-{i}"), 64) < 64);
        }
        assert_eq!(shard_of("anything", 0), 0);
    }

    #[test]
    fn spreads_devices_over_shards() {
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[shard_of(&format!("device-{i}"), 64) as usize] += 1;
        }
        // 1000 expected per shard; FNV-1a keeps every shard within 20%.
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }
}
