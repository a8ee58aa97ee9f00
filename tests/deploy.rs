//! The operator files in `deploy/`: the Prometheus alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), the example Prometheus configuration passes
//! `promtool check config`, and the Grafana dashboard is a dashboard whose every panel queries
//! something. (That every metric they name is exported is checked against live services in
//! `observability.rs`.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool(args: &[&str], file: &str) -> String {
    let out = Command::new("promtool")
        .args(args)
        .arg(deploy(file))
        .output()
        .expect("promtool runs (scripts/test.sh installs Debian's prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} {file}: {text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules"], "prometheus/openinfer-alerts.yml");
    assert!(checked.contains("SUCCESS"), "{checked}");
    let rules = std::fs::read_to_string(deploy("prometheus/openinfer-alerts.yml")).unwrap();
    for alert in [
        "OpenInferHighRefusalRate",
        "OpenInferTTFTSLOBurn",
        "OpenInferNoWorkers",
        "OpenInferEtcdUnreachable",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} is missing"
        );
    }
    let tested = promtool(&["test", "rules"], "prometheus/openinfer-alerts.test.yml");
    assert!(tested.contains("SUCCESS"), "{tested}");
    promtool(&["check", "config"], "prometheus/prometheus.yml");
}

#[test]
fn the_dashboard_has_a_query_in_every_panel() {
    let text = std::fs::read_to_string(deploy("grafana/openinfer-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = d["panels"].as_array().expect("panels");
    let mut queried = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("no targets: {p}"));
        assert!(
            !targets.is_empty(),
            "panel `{}` queries nothing",
            p["title"]
        );
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains("openinfer_"),
                "panel `{}`: {expr}",
                p["title"]
            );
        }
        queried += 1;
    }
    assert!(queried >= 10, "{queried} panels");
    for needle in [
        "histogram_quantile",
        "openinfer_router_queue_depth",
        "openinfer_router_admission_refusals_total",
        "openinfer_worker_kv_blocks_used",
        "openinfer_router_worker_running_sequences",
    ] {
        assert!(text.contains(needle), "the dashboard shows {needle}");
    }
}
