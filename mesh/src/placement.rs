//! Which live node should own each shard: rendezvous (highest random
//! weight) hashing.
//!
//! Every node computes the same answer from the same live set, with no
//! coordination: the owner of shard `s` is the node `n` with the highest
//! `weight(n, s)`. When a node joins, it takes exactly the shards for which
//! it now has the highest weight (about S/(N+1)); when a node leaves, only
//! its shards move. No shard ever moves between two nodes that both stayed,
//! because their weights for it did not change.
//!
//! `weight(n, s) = mix(fnv1a64(n) ^ mix(s))` with `mix` the SplitMix64
//! finalizer; ties (astronomically unlikely) go to the smaller node id.

use fluxmesh_schemas::shard::fnv1a64;

/// SplitMix64's finalizer: spreads nearby inputs over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous weight of `node` for `shard`.
pub fn weight(node: &str, shard: u32) -> u64 {
    mix(fnv1a64(node.as_bytes()) ^ mix(u64::from(shard) + 1))
}

/// The desired owner of `shard` among `nodes`, or `None` if there are none.
pub fn owner<S: AsRef<str>>(shard: u32, nodes: &[S]) -> Option<&str> {
    nodes.iter().map(AsRef::as_ref).max_by(|a, b| weight(a, shard).cmp(&weight(b, shard)).then_with(|| b.cmp(a)))
}

/// The desired owner of every shard `0..shards`.
pub fn assignment<S: AsRef<str>>(shards: u32, nodes: &[S]) -> Vec<Option<String>> {
    (0..shards).map(|s| owner(s, nodes).map(str::to_owned)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_nodes_no_owner() {
        assert_eq!(owner::<&str>(3, &[]), None);
    }

    #[test]
    fn order_of_the_live_set_does_not_matter() {
        let a = ["n1", "n2", "n3"];
        let b = ["n3", "n1", "n2"];
        assert_eq!(assignment(64, &a), assignment(64, &b));
    }

    #[test]
    fn three_nodes_share_64_shards_roughly_evenly() {
        let nodes = ["node-1", "node-2", "node-3"];
        let owners = assignment(64, &nodes);
        for n in nodes {
            let count = owners.iter().filter(|o| o.as_deref() == Some(n)).count();
            assert!((10..=33).contains(&count), "{n} owns {count} of 64");
        }
    }
}
