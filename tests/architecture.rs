//! The crate graph's invariants (docs/code-map.md): the router never links candle or the
//! engine, the engine never sees protobuf, gRPC or tokio, `core` depends on nothing of the
//! workspace, and the registry links neither candle nor the router. Read from `cargo
//! metadata`'s resolved graph, so a dependency that arrives indirectly counts too.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// Every package `crate_name` links (normal dependencies, transitively), by name.
fn links(meta: &serde_json::Value, crate_name: &str) -> BTreeSet<String> {
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let normal = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap())
                .collect();
            (n["id"].as_str().unwrap(), normal)
        })
        .collect();
    let root = names
        .iter()
        .find(|(_, n)| **n == crate_name)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("no package {crate_name}"));
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for &dep in nodes.get(id).into_iter().flatten() {
            if seen.insert(names[dep].to_string()) {
                todo.push(dep);
            }
        }
    }
    seen
}

#[test]
fn the_crate_graph_keeps_its_invariants() {
    // The host's graph: other platforms' crates are neither built nor downloaded here.
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules: [(&str, &[&str]); 6] = [
        (
            "openinfer-router",
            &["candle-core", "openinfer-engine", "openinfer-worker"],
        ),
        (
            "openinfer-engine",
            &["prost", "tonic", "tokio", "openinfer-proto"],
        ),
        (
            "openinfer-registry",
            &["candle-core", "openinfer-router", "openinfer-engine"],
        ),
        ("openinfer-worker", &["openinfer-router", "openinfer-bench"]),
        (
            "openinfer-core",
            &["openinfer-proto", "tokio", "tonic", "candle-core"],
        ),
        (
            "openinfer-net",
            &[
                "openinfer-core",
                "openinfer-proto",
                "openinfer-router",
                "openinfer-worker",
                "candle-core",
            ],
        ),
    ];
    for (krate, forbidden) in rules {
        let linked = links(&meta, krate);
        assert!(
            linked.len() > 1 || krate == "openinfer-core",
            "{krate}: {linked:?}"
        );
        for f in forbidden {
            assert!(
                !linked.contains(*f),
                "{krate} links {f}, which docs/code-map.md forbids"
            );
        }
    }
    // And the rule is not vacuous: the worker does link the engine and the proto crate.
    let worker = links(&meta, "openinfer-worker");
    assert!(worker.contains("openinfer-engine") && worker.contains("openinfer-proto"));
}
