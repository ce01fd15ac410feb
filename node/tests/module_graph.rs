//! The node's modules form no cycle: each file's `crate::…` and `super::…`
//! paths name the modules it uses, and no module reaches itself through
//! them. (A parent declaring its children is not a use; a child may use
//! its parent's items.) Test code is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module file under `src`, by module path (`mqtt::broker`).
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    dirs.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative: PathBuf = path.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            // Tests may reach anywhere.
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            // Comments (doc links included) use nothing.
            let text: String =
                text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The `a::b::c` path that follows each `prefix` in `text`.
fn paths_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    text.match_indices(prefix).filter_map(move |(at, _)| {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &text[at + prefix.len()..];
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(':');
        Some(path.to_owned())
    })
}

/// The longest module that `path` starts with.
fn module_of<'a>(path: &str, names: &'a BTreeSet<String>) -> Option<&'a String> {
    names
        .iter()
        .filter(|n| !n.is_empty() && (path == n.as_str() || path.starts_with(&format!("{n}::"))))
        .max_by_key(|n| n.len())
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &modules {
        let parent = module.rsplit_once("::").map(|(p, _)| p.to_owned()).unwrap_or_default();
        let mut uses = BTreeSet::new();
        for path in paths_after(text, "crate::") {
            uses.extend(module_of(&path, &names).cloned());
        }
        for path in paths_after(text, "super::") {
            let full = if parent.is_empty() { path } else { format!("{parent}::{path}") };
            // `super::{…}` or an item of the parent: the parent itself.
            uses.extend(module_of(&full, &names).or_else(|| names.get(&parent)).cloned());
        }
        uses.remove(module);
        uses.remove("");
        edges.insert(module.clone(), uses);
    }
    edges
}

/// One cycle through `start`, if any.
fn cycle_through(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![start.to_owned()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn the_node_modules_have_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    assert!(edges.len() > 40, "found only {} modules under {}", edges.len(), src.display());
    // The graph is real: known uses are found.
    assert!(edges["mqtt::broker"].contains("mqtt::outbox"), "{:?}", edges["mqtt::broker"]);
    assert!(edges["rules::http"].contains("api"), "{:?}", edges["rules::http"]);
    let cycles: BTreeSet<String> =
        edges.keys().filter_map(|m| cycle_through(m, &edges)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn a_cycle_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("a")).expect("mkdir");
    std::fs::write(dir.path().join("lib.rs"), "pub mod a;\npub mod b;\n").expect("write");
    std::fs::write(dir.path().join("a/mod.rs"), "pub mod c;\nuse crate::b::X;\n").expect("write");
    std::fs::write(dir.path().join("a/c.rs"), "use super::Y;\n").expect("write");
    std::fs::write(dir.path().join("b.rs"), "pub struct X(crate::a::c::Z);\n").expect("write");
    let edges = graph(dir.path());
    assert_eq!(cycle_through("b", &edges), Some(vec!["b".into(), "a::c".into(), "a".into(), "b".into()]));
    // A child using its parent is no cycle by itself.
    assert_eq!(cycle_through("a::c", &edges), Some(vec!["a::c".into(), "a".into(), "b".into(), "a::c".into()]));
    std::fs::write(dir.path().join("b.rs"), "pub struct X;\n").expect("write");
    let edges = graph(dir.path());
    assert_eq!(cycle_through("a::c", &edges), None);
}
