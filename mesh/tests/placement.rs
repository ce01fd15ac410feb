//! Properties of rendezvous placement: a join or a leave moves only the
//! shards it must, about S/(N+1) of them, and never between two nodes that
//! both stayed.

use fluxmesh_mesh::placement::assignment;
use proptest::prelude::*;

fn nodes(ids: &[u16]) -> Vec<String> {
    ids.iter().map(|i| format!("node-{i}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn a_join_moves_shards_only_to_the_newcomer(
        ids in prop::collection::hash_set(0u16..5000, 1..12),
        newcomer in 5000u16..6000,
        shards in prop::sample::select(vec![16u32, 64, 256, 1024]),
    ) {
        let before_ids: Vec<u16> = ids.into_iter().collect();
        let before = nodes(&before_ids);
        let mut after = before.clone();
        after.push(format!("node-{newcomer}"));
        let (a, b) = (assignment(shards, &before), assignment(shards, &after));
        let mut moved = 0u32;
        for (s, (old, new)) in a.iter().zip(&b).enumerate() {
            if old != new {
                moved += 1;
                prop_assert_eq!(new.as_deref(), Some(after[after.len() - 1].as_str()),
                    "shard {} moved from {:?} to {:?}, not to the newcomer", s, old, new);
            }
        }
        // Expected S/(N+1); allow generous binomial spread.
        let n1 = after.len() as f64;
        let expected = f64::from(shards) / n1;
        let sd = (f64::from(shards) * (1.0 / n1) * (1.0 - 1.0 / n1)).sqrt();
        prop_assert!(f64::from(moved) <= expected + 5.0 * sd + 2.0,
            "{} of {} shards moved for N+1 = {}, expected about {:.1}", moved, shards, n1, expected);
    }

    #[test]
    fn a_leave_moves_only_the_leavers_shards(
        ids in prop::collection::hash_set(0u16..5000, 2..12),
        pick in any::<prop::sample::Index>(),
        shards in prop::sample::select(vec![16u32, 64, 256, 1024]),
    ) {
        let before_ids: Vec<u16> = ids.into_iter().collect();
        let before = nodes(&before_ids);
        let leaver = before[pick.index(before.len())].clone();
        let after: Vec<String> = before.iter().filter(|n| **n != leaver).cloned().collect();
        let (a, b) = (assignment(shards, &before), assignment(shards, &after));
        for (s, (old, new)) in a.iter().zip(&b).enumerate() {
            if old != new {
                prop_assert_eq!(old.as_deref(), Some(leaver.as_str()),
                    "shard {} moved from {:?} (which stayed) to {:?}", s, old, new);
            }
        }
    }
}
