//! Matching MQTT topic names against subscription filters.
//!
//! [`FilterTree`] holds every subscription of the node's sessions, one tree
//! level per topic level, so matching a topic costs its number of levels
//! (times the wildcard branches taken), not the number of subscriptions.
//! The rules are MQTT's (3.1.1 section 4.7, 5.0 section 4.7): `+` matches
//! exactly one level, `#` (last) matches the parent level and any number of
//! levels below it, and a topic starting with `$` is matched by no filter
//! that starts with a wildcard.

use std::collections::HashMap;
use std::hash::Hash;

/// Subscriptions by filter, each with a key (the session) and a value.
#[derive(Debug)]
pub struct FilterTree<K, V> {
    root: Level<K, V>,
    len: usize,
}

#[derive(Debug)]
struct Level<K, V> {
    children: HashMap<Box<str>, Level<K, V>>,
    plus: Option<Box<Level<K, V>>>,
    /// Filters that end here with `/#` (or are `#`, at the root).
    hash: HashMap<K, V>,
    /// Filters that end exactly here.
    exact: HashMap<K, V>,
}

impl<K, V> Default for Level<K, V> {
    fn default() -> Self {
        Level { children: HashMap::new(), plus: None, hash: HashMap::new(), exact: HashMap::new() }
    }
}

impl<K, V> Level<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.exact.is_empty()
    }
}

impl<K, V> Default for FilterTree<K, V> {
    fn default() -> Self {
        FilterTree { root: Level::default(), len: 0 }
    }
}

impl<K: Eq + Hash + Clone, V> FilterTree<K, V> {
    /// Subscriptions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds (or replaces) `key`'s subscription to `filter`, a valid filter.
    /// Returns the value it replaced.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut level = &mut self.root;
        let mut parts = filter.split('/').peekable();
        while let Some(part) = parts.next() {
            if part == "#" && parts.peek().is_none() {
                let old = level.hash.insert(key, value);
                self.len += usize::from(old.is_none());
                return old;
            }
            level = if part == "+" {
                level.plus.get_or_insert_with(Box::default)
            } else {
                level.children.entry(part.into()).or_default()
            };
        }
        let old = level.exact.insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    /// Removes `key`'s subscription to `filter`, pruning levels left empty.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let parts: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &parts, key);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Calls `found` for every subscription whose filter matches `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut found: impl FnMut(&'a K, &'a V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, !dollar, &mut found);
    }
}

/// MQTT's rule for one filter, level by level, for a session's few
/// subscriptions (the tree is for the node's many). rumqttc's `matches`
/// refuses every `$` topic, even for `$SYS/#`.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut levels = topic.split('/');
    let mut parts = filter.split('/').peekable();
    while let Some(part) = parts.next() {
        if part == "#" && parts.peek().is_none() {
            return true;
        }
        match levels.next() {
            Some(level) if part == "+" || part == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

fn remove_at<K: Eq + Hash, V>(level: &mut Level<K, V>, parts: &[&str], key: &K) -> Option<V> {
    let Some((part, rest)) = parts.split_first() else {
        return level.exact.remove(key);
    };
    if *part == "#" && rest.is_empty() {
        return level.hash.remove(key);
    }
    if *part == "+" {
        let child = level.plus.as_mut()?;
        let removed = remove_at(child, rest, key);
        if child.is_empty() {
            level.plus = None;
        }
        return removed;
    }
    let child = level.children.get_mut(*part)?;
    let removed = remove_at(child, rest, key);
    if child.is_empty() {
        level.children.remove(*part);
    }
    removed
}

/// `wild`: whether wildcards at this level may match (not for the first
/// level of a `$` topic).
fn walk<'a, K, V>(level: &'a Level<K, V>, levels: &[&str], wild: bool, found: &mut impl FnMut(&'a K, &'a V)) {
    if wild {
        level.hash.iter().for_each(|(k, v)| found(k, v));
    }
    let Some((first, rest)) = levels.split_first() else {
        level.exact.iter().for_each(|(k, v)| found(k, v));
        return;
    };
    if let Some(child) = level.children.get(*first) {
        walk(child, rest, true, found);
    }
    if wild {
        if let Some(plus) = &level.plus {
            walk(plus, rest, true, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matching(tree: &FilterTree<u32, ()>, topic: &str) -> Vec<u32> {
        let mut keys = Vec::new();
        tree.for_each_match(topic, |k, _| keys.push(*k));
        keys.sort_unstable();
        keys
    }

    #[test]
    fn mqtt_matching_rules() {
        let mut tree = FilterTree::default();
        let filters = ["#", "+", "a/#", "a/+", "a/b", "+/b", "/a", "+/+", "$SYS/#", "a/+/c", "a//b"];
        for (i, f) in filters.iter().enumerate() {
            tree.insert(f, i as u32, ());
        }
        assert_eq!(tree.len(), filters.len());
        assert_eq!(matching(&tree, "a"), vec![0, 1, 2], "`a/#` matches its parent level");
        assert_eq!(matching(&tree, "a/b"), vec![0, 2, 3, 4, 5, 7]);
        assert_eq!(matching(&tree, "/a"), vec![0, 6, 7], "an empty first level");
        assert_eq!(matching(&tree, "a/x/c"), vec![0, 2, 9]);
        assert_eq!(matching(&tree, "a//b"), vec![0, 2, 10]);
        assert_eq!(matching(&tree, "$SYS/x"), vec![8], "wildcards do not match `$` topics");
        assert_eq!(matching(&tree, "$SYS"), vec![8]);
        assert_eq!(matching(&tree, "b/c/d"), vec![0]);
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut tree = FilterTree::default();
        tree.insert("a/+/c", 1, ());
        tree.insert("a/+/c", 2, ());
        assert!(tree.insert("a/+/c", 2, ()).is_some(), "a second insert replaces");
        tree.insert("a/#", 1, ());
        assert_eq!(tree.len(), 3);
        assert!(tree.remove("a/+/c", &1).is_some());
        assert!(tree.remove("a/+/c", &1).is_none());
        assert!(tree.remove("a/b/c", &2).is_none(), "a topic is not the filter");
        assert_eq!(matching(&tree, "a/x/c"), vec![1, 2]);
        assert!(tree.remove("a/+/c", &2).is_some());
        assert!(tree.remove("a/#", &1).is_some());
        assert_eq!(tree.len(), 0);
        assert!(tree.root.is_empty(), "every level is pruned");
    }

    fn level() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "", "$x"]).prop_map(str::to_owned)
    }

    proptest! {
        /// The tree agrees with the one-filter rule on every topic.
        #[test]
        fn agrees_with_the_reference_matcher(
            filters in proptest::collection::vec(
                (proptest::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..4), prop::bool::ANY)
                    .prop_map(|(levels, hash)| {
                        let filter = levels.join("/");
                        if hash { format!("{filter}/#") } else { filter }
                    }),
                1..8),
            topic in proptest::collection::vec(level(), 1..5),
        ) {
            let topic = topic.join("/");
            let mut tree = FilterTree::default();
            for (i, f) in filters.iter().enumerate() {
                tree.insert(f, i as u32, ());
            }
            let mut expected: Vec<u32> = filters.iter().enumerate()
                .filter(|(_, f)| matches(&topic, f))
                .map(|(i, _)| i as u32)
                .collect();
            expected.sort_unstable();
            expected.dedup();
            let mut got = matching(&tree, &topic);
            got.dedup();
            prop_assert_eq!(got, expected, "topic {:?} filters {:?}", topic, filters);
        }
    }
}
