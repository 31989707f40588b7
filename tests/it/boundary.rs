//! The crate's shape: agent and server share only the wire contract and leaf modules, and no two
//! top-level modules import each other, directly or round a longer loop. Read from the source, so
//! a new `use crate::agent` under `src/server/` fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module a file under `src/` belongs to (`src/agent/gate/mod.rs` → `agent`).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    (first != "bin" && first != "lib.rs").then(|| first.trim_end_matches(".rs").to_string())
}

/// `crate::NAME` references in `text`, outside comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

fn graph() -> BTreeMap<String, BTreeMap<String, Vec<PathBuf>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let mut g: BTreeMap<String, BTreeMap<String, Vec<PathBuf>>> = BTreeMap::new();
    for f in files {
        let Some(from) = top_module(&src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for to in crate_refs(&text) {
            if to != from {
                g.entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .push(f.clone());
            }
        }
    }
    g
}

#[test]
fn the_server_reaches_the_agent_only_through_the_demo() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server");
    let mut files = vec![];
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found only {} server files", files.len());
    let mut offenders = vec![];
    for f in files {
        if f.ends_with("demo.rs") {
            continue;
        }
        let refs = crate_refs(&std::fs::read_to_string(&f).unwrap());
        for agent_side in ["agent", "config", "status", "systemd"] {
            if refs.contains(agent_side) {
                offenders.push(format!("{} uses crate::{agent_side}", f.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn leaf_modules_import_neither_side() {
    let g = graph();
    for leaf in [
        "backoff",
        "crypto",
        "fsutil",
        "httpserve",
        "password",
        "protocol",
        "quic",
        "secret",
        "tls",
        "token",
        "web",
    ] {
        let uses: Vec<_> = g
            .get(leaf)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for side in ["agent", "server", "config", "status"] {
            assert!(
                !uses.contains(&side.to_string()),
                "{leaf} uses crate::{side}: {:?}",
                g[leaf][side]
            );
        }
    }
    assert!(
        !g.contains_key("crypto"),
        "crypto is a leaf: {:?}",
        g.get("crypto")
    );
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let g = graph();
    // Depth-first search for a back edge; the demo's use of the agent is the one edge from the
    // server to the agent, and the agent never names the server.
    fn visit(
        g: &BTreeMap<String, BTreeMap<String, Vec<PathBuf>>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} → {node}", path[i..].join(" → "));
        }
        if !done.insert(node.to_string()) {
            return;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flat_map(|m| m.keys()) {
            if g.contains_key(next) || next != node {
                visit(g, next, path, done);
            }
        }
        path.pop();
    }
    assert!(g.len() > 10, "graph has {} modules", g.len());
    let mut done = BTreeSet::new();
    for node in g.keys() {
        visit(&g, node, &mut vec![], &mut done);
    }
}
