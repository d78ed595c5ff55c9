//! The datanode's modules import in one direction (docs/design.md, "Layers"):
//!
//! engine ← store ← cluster ← front ← api ← server
//!
//! with `metrics`, `request` and `tls` beside them all. This reads the sources (every `crate::…` and `super::…` path)
//! and fails on an import that goes back up a layer, and on any cycle between modules (a module
//! being a file or a directory directly under a layer, e.g. `engine::volume`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: [&str; 6] = ["engine", "store", "cluster", "front", "api", "server"];
/// Modules every layer may use, which use none of them.
const BESIDE: [&str; 3] = ["metrics", "request", "tls"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a source file belongs to, as (layer, module): `src/engine/volume/writer.rs` →
/// (engine, volume); `src/store.rs` → (store, ""); `src/engine/mod.rs` → (engine, "").
fn module_of(src: &Path, file: &Path) -> (String, String) {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> =
        rel.iter().map(|p| p.to_str().unwrap().trim_end_matches(".rs").to_owned()).filter(|p| p != "mod").collect();
    (parts[0].clone(), parts.get(1).cloned().unwrap_or_default())
}

/// Code without comments and string literals (a path in a doc comment is not an import).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.split("//").next().unwrap();
        let mut in_string = false;
        let mut escaped = false;
        for c in line.chars() {
            if in_string {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => escaped = false,
                }
            } else if c == '"' {
                in_string = true;
            } else {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The modules a file's code names: `crate::a::b` → (a, b), and `super::b` from a file of layer
/// `a` → (a, b) (only when the file's own module is directly under the layer).
fn references(code: &str, own: &(String, String), depth: usize) -> BTreeSet<(String, String)> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let layer = ident(rest);
        let after = &rest[layer.len()..];
        let module = after.strip_prefix("::").map(ident).unwrap_or_default();
        // `crate::engine::{a, b}` names the layer's root.
        out.insert((
            layer,
            if module.chars().next().is_some_and(|c| c.is_lowercase()) { module } else { String::new() },
        ));
    }
    // `super::x` in a file that is a module directly under its layer names a sibling.
    if depth == 2 {
        for (i, _) in code.match_indices("super::") {
            let module = ident(&code[i + "super::".len()..]);
            if module.chars().next().is_some_and(|c| c.is_lowercase()) && module != "super" {
                out.insert((own.0.clone(), module));
            }
        }
    }
    out
}

#[test]
fn modules_import_one_way_and_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<(String, String), BTreeSet<(String, String)>> = BTreeMap::new();
    let mut wrong_way = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let own = module_of(&src, file);
        // A file directly under a layer's directory (or a directory module's mod.rs).
        let depth = rel.iter().filter(|p| *p != "mod.rs").count();
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for target in references(&code, &own, depth) {
            if BESIDE.contains(&target.0.as_str()) {
                continue; // beside every layer
            }
            if BESIDE.contains(&own.0.as_str()) {
                wrong_way.push(format!("{}: {} imports {}", rel.display(), own.0, target.0));
                continue;
            }
            if let (Some(from), Some(to)) = (rank(&own.0), rank(&target.0)) {
                if to > from {
                    wrong_way.push(format!("{}: {} imports {}, a layer above it", rel.display(), own.0, target.0));
                }
            }
            if target != own && !target.1.is_empty() && !own.1.is_empty() {
                graph.entry(own.clone()).or_default().insert(target);
            } else if target.0 != own.0 {
                graph.entry((own.0.clone(), String::new())).or_default().insert((target.0.clone(), String::new()));
            }
        }
    }
    assert!(wrong_way.is_empty(), "imports against the layers:\n{}", wrong_way.join("\n"));
    // Cycles: depth-first search over the module graph.
    fn visit(
        node: &(String, String),
        graph: &BTreeMap<(String, String), BTreeSet<(String, String)>>,
        path: &mut Vec<(String, String)>,
        done: &mut BTreeSet<(String, String)>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            let cycle: Vec<String> = path[at..].iter().chain([node]).map(|(l, m)| format!("{l}::{m}")).collect();
            cycles.push(cycle.join(" → "));
            return;
        }
        if !done.insert(node.clone()) {
            return;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}
