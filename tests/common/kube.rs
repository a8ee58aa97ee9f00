//! A rendered Helm release run as local processes, the way the kubelet would start its pods,
//! for the chart's render-and-run tests (`tests/helm.rs`). Each pod gets a loopback address
//! of its own; cluster DNS names and `0.0.0.0` become those addresses; volumes become
//! directories; the downward API and `$(VAR)` references resolve as the kubelet resolves
//! them; the image's entrypoint is this build's binary; and the pod's own probes say when it
//! has started and is ready. What the chart passes is passed unchanged otherwise, so a flag
//! or variable the binary does not accept fails the test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Proc;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `tests/helm/chart.py ARGS` with the test Python (Helm's Go SDK, kubernetes-validate);
/// its exit code and output.
pub fn chart_py(args: &[&str]) -> (i32, String, String) {
    let helm_home = std::env::temp_dir().join("openinfer-test-helm");
    let out = Command::new(super::python())
        .arg(root().join("tests/helm/chart.py"))
        .args(args)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .output()
        .expect("the test Python runs (scripts/test.sh makes target/test-venv)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The objects of a release rendered by Helm from a values file (and a JSON overlay).
pub struct Release {
    /// Every rendered object.
    pub objects: Vec<Value>,
    /// The rendered NOTES.txt.
    pub notes: String,
}

impl Release {
    /// Renders the chart with `values` (namespace `ai`, release `demo`).
    pub fn render(values: &Path, overlay: Option<&str>) -> Release {
        let mut args = vec!["render", values.to_str().unwrap()];
        if let Some(o) = overlay {
            args.extend(["--set", o]);
        }
        let (code, out, err) = chart_py(&args);
        assert_eq!(code, 0, "rendering {} failed:\n{err}", values.display());
        let v: Value = serde_json::from_str(&out).unwrap();
        Release {
            objects: v["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["object"].clone())
                .collect(),
            notes: v["notes"].as_str().unwrap_or_default().to_string(),
        }
    }

    /// The objects of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The one object of `kind` whose name ends with `suffix`.
    pub fn one(&self, kind: &str, suffix: &str) -> &Value {
        let found: Vec<_> = self
            .all(kind)
            .into_iter()
            .filter(|o| name(o).ends_with(suffix))
            .collect();
        assert_eq!(found.len(), 1, "{kind} *{suffix}: {} found", found.len());
        found[0]
    }
}

/// `metadata.name`.
pub fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

/// A string map (labels, annotations, a selector).
pub fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Cluster DNS: names (longest first when rewriting) and the pod addresses they resolve to.
#[derive(Default, Clone)]
pub struct Dns {
    names: Vec<(String, String)>,
}

impl Dns {
    /// Makes `name` resolve to `ip`.
    pub fn add(&mut self, name: &str, ip: &str) {
        self.names.push((name.to_string(), ip.to_string()));
        self.names.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    }

    /// A Service's names in `namespace` (short, namespaced and fully qualified).
    pub fn add_service(&mut self, service: &str, namespace: &str, domain: &str, ip: &str) {
        for n in [
            format!("{service}.{namespace}.svc.{domain}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}"),
        ] {
            self.add(&n, ip);
        }
    }

    fn resolve(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (name, ip) in &self.names {
            out = out.replace(name.as_str(), ip);
        }
        out
    }
}

/// One container's process line as the kubelet would run it.
struct Program {
    exe: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// A pod made from a pod template, its containers run as local processes.
pub struct Pod {
    /// The pod's name (also its HOSTNAME).
    pub name: String,
    /// Its loopback address.
    pub ip: String,
    namespace: String,
    template: Value,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    /// Variables set ahead of the container's own (what an admission webhook adds).
    injected: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    volumes: BTreeMap<String, PathBuf>,
    /// (container, runs openinfer, process).
    running: Vec<(String, bool, Proc)>,
}

impl Pod {
    /// A pod of `template` (`metadata` + `spec`); hostPath volumes are the directories
    /// `host_paths` maps their paths to; every other volume is a fresh directory.
    pub fn new(
        name: &str,
        ip: &str,
        namespace: &str,
        template: &Value,
        host_paths: &BTreeMap<String, PathBuf>,
    ) -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = BTreeMap::new();
        for v in template["spec"]["volumes"].as_array().into_iter().flatten() {
            let vname = v["name"].as_str().unwrap().to_string();
            let path = match v["hostPath"]["path"].as_str() {
                Some(p) => host_paths
                    .get(p)
                    .unwrap_or_else(|| panic!("hostPath {p} of pod {name} is not mapped"))
                    .clone(),
                None => {
                    assert!(
                        v.get("emptyDir").is_some(),
                        "volume {vname} of pod {name}: only emptyDir and hostPath are run here"
                    );
                    let p = dir.path().join(&vname);
                    std::fs::create_dir_all(&p).unwrap();
                    p
                }
            };
            volumes.insert(vname, path);
        }
        Pod {
            name: name.to_string(),
            ip: ip.to_string(),
            namespace: namespace.to_string(),
            labels: string_map(&template["metadata"]["labels"]),
            annotations: string_map(&template["metadata"]["annotations"]),
            template: template.clone(),
            injected: Vec::new(),
            _dir: dir,
            volumes,
            running: Vec::new(),
        }
    }

    /// Gives the pod the volume `volume` of a StatefulSet's claim template (a fresh directory).
    pub fn claim(&mut self, volume: &str) {
        let p = self._dir.path().join(volume);
        std::fs::create_dir_all(&p).unwrap();
        self.volumes.insert(volume.to_string(), p);
    }

    /// Sets variables ahead of each container's own, as an admission webhook would.
    pub fn inject_env(&mut self, vars: &[(&str, String)]) {
        self.injected
            .extend(vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
    }

    /// Adds labels and annotations (what a controller sets on the pods it makes).
    pub fn annotate(&mut self, labels: &[(&str, &str)], annotations: &[(&str, &str)]) {
        for (k, v) in labels {
            self.labels.insert(k.to_string(), v.to_string());
        }
        for (k, v) in annotations {
            self.annotations.insert(k.to_string(), v.to_string());
        }
    }

    /// The pod's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The pod spec.
    pub fn spec(&self) -> &Value {
        &self.template["spec"]
    }

    fn containers(&self, key: &str) -> Vec<Value> {
        self.spec()[key].as_array().cloned().unwrap_or_default()
    }

    /// A downward-API field.
    fn field(&self, path: &str) -> String {
        let quoted = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "status.podIP" | "status.hostIP" => self.ip.clone(),
            _ => {
                if let Some(k) = quoted("metadata.annotations['") {
                    return self.annotations.get(&k).cloned().unwrap_or_default();
                }
                if let Some(k) = quoted("metadata.labels['") {
                    return self.labels.get(&k).cloned().unwrap_or_default();
                }
                panic!("downward API field {path} is not emulated")
            }
        }
    }

    /// The container's environment, resolved in order as the kubelet does it.
    fn env(&self, c: &Value, dns: &Dns) -> Vec<(String, String)> {
        let mut vars = self.injected.clone();
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap().to_string();
            if vars.iter().any(|(k, _)| *k == key) && self.injected.iter().any(|(k, _)| *k == key) {
                continue; // the webhook's value stands
            }
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &vars)
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                self.field(path)
            } else {
                panic!(
                    "{}: env {key} needs {}, which is not emulated",
                    self.name, e["valueFrom"]
                )
            };
            vars.retain(|(k, _)| *k != key);
            vars.push((key, value));
        }
        let mounts = self.mounts(c);
        vars.into_iter()
            .map(|(k, v)| (k, self.localize(&v, dns, &mounts)))
            .collect()
    }

    /// (mount path, local directory) of the container's volume mounts.
    fn mounts(&self, c: &Value) -> Vec<(String, PathBuf)> {
        let mut m: Vec<(String, PathBuf)> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|vm| {
                let vol = vm["name"].as_str().unwrap();
                (
                    vm["mountPath"].as_str().unwrap().to_string(),
                    self.volumes
                        .get(vol)
                        .unwrap_or_else(|| panic!("{}: no volume {vol}", self.name))
                        .clone(),
                )
            })
            .collect();
        m.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        m
    }

    /// A value as the process sees it here: cluster names and the wildcard address become
    /// pod addresses, and paths under a mount point move under that volume's directory.
    fn localize(&self, s: &str, dns: &Dns, mounts: &[(String, PathBuf)]) -> String {
        let s = dns.resolve(&s.replace("0.0.0.0:", &format!("{}:", self.ip)));
        // A path is the whole value or what follows the `=` of `--flag=PATH`.
        let start = if s.starts_with('/') {
            0
        } else {
            match s.find("=/") {
                Some(i) => i + 1,
                None => return s,
            }
        };
        let path = &s[start..];
        for (mount, dir) in mounts {
            if let Some(rest) = path.strip_prefix(mount.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{}{}{rest}", &s[..start], dir.display());
                }
            }
        }
        s
    }

    fn program(&self, c: &Value, entrypoint: &[String], dns: &Dns) -> Program {
        let command: Vec<String> = match c["command"].as_array() {
            Some(cmd) => cmd
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            None => entrypoint.to_vec(),
        };
        let env = self.env(c, dns);
        let mounts = self.mounts(c);
        let exe = match command[0].as_str() {
            "/usr/local/bin/openinfer" => super::bin(),
            "/usr/local/bin/etcd" => super::etcd::etcd_binary(),
            other => panic!("{}: no local program for {other}", self.name),
        };
        let args = command[1..]
            .iter()
            .cloned()
            .chain(
                c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a.as_str().unwrap().to_string()),
            )
            .map(|a| self.localize(&expand(&a, &env), dns, &mounts))
            .collect();
        Program { exe, args, env }
    }

    fn spawn(&self, c: &Value, entrypoint: &[String], dns: &Dns) -> Proc {
        let p = self.program(c, entrypoint, dns);
        let tag = format!("{}/{}", self.name, c["name"].as_str().unwrap());
        let mut child = Command::new(&p.exe)
            .args(&p.args)
            .env_clear()
            .envs(p.env)
            .env("HOSTNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tag}: {} {:?}: {e}", p.exe.display(), p.args));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tag = tag.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("{tag}: {line}");
                }
            });
        }
        Proc(child)
    }

    /// Runs the init containers to completion, then starts the containers.
    pub async fn start(&mut self, entrypoint: &[String], dns: &Dns) {
        for c in self.containers("initContainers") {
            let mut p = self.spawn(&c, entrypoint, dns);
            let status = p
                .exit_within(
                    Duration::from_secs(120),
                    &format!("init container {} of {}", c["name"], self.name),
                )
                .await;
            assert!(
                status.success(),
                "init container {} of {} failed: {status}",
                c["name"],
                self.name
            );
        }
        for c in self.containers("containers") {
            let ours = self.program(&c, entrypoint, dns).exe == super::bin();
            let p = self.spawn(&c, entrypoint, dns);
            self.running
                .push((c["name"].as_str().unwrap().to_string(), ours, p));
        }
    }

    /// A container's port, by name or number.
    pub fn port(&self, container: &Value, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let wanted = port.as_str().unwrap();
        container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == wanted)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no port named {wanted}", self.name)) as u16
    }

    /// The address of the named port of any of the pod's containers.
    pub fn named_port(&self, port: &Value) -> SocketAddr {
        let number = match port.as_u64() {
            Some(n) => n as u16,
            None => self
                .containers("containers")
                .iter()
                .find(|c| {
                    c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["name"] == *port)
                })
                .map(|c| self.port(c, port))
                .unwrap_or_else(|| panic!("{}: no container has port {port}", self.name)),
        };
        format!("{}:{number}", self.ip).parse().unwrap()
    }

    /// Runs one probe of a container once; whether it passed.
    async fn probe_once(&self, c: &Value, probe: &Value) -> bool {
        let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
        if let Some(g) = probe.get("grpc") {
            let addr = format!("{}:{}", self.ip, self.port(c, &g["port"]));
            let service = g["service"].as_str().unwrap_or_default().to_string();
            return tokio::time::timeout(timeout, grpc_serving(addr, service))
                .await
                .unwrap_or(false);
        }
        if let Some(h) = probe.get("httpGet") {
            let addr: SocketAddr = format!("{}:{}", self.ip, self.port(c, &h["port"]))
                .parse()
                .unwrap();
            let path = h["path"].as_str().unwrap_or("/").to_string();
            return tokio::task::spawn_blocking(move || http_status(addr, &path, timeout))
                .await
                .unwrap()
                .is_some_and(|s| (200..400).contains(&s));
        }
        if let Some(t) = probe.get("tcpSocket") {
            let addr: SocketAddr = format!("{}:{}", self.ip, self.port(c, &t["port"]))
                .parse()
                .unwrap();
            return TcpStream::connect_timeout(&addr, timeout).is_ok();
        }
        panic!("{}: probe {probe} is not emulated", self.name)
    }

    /// Probes every container as the kubelet would: the startup probe until it passes
    /// within its own budget (failureThreshold × periodSeconds, at most `cap`), then the
    /// readiness probe until it passes within `cap`.
    pub async fn until_ready(&mut self, cap: Duration) {
        for c in self.containers("containers") {
            for kind in ["startupProbe", "readinessProbe"] {
                let Some(probe) = c.get(kind) else { continue };
                let budget = Duration::from_secs(
                    probe["failureThreshold"].as_u64().unwrap_or(3)
                        * probe["periodSeconds"].as_u64().unwrap_or(10),
                )
                .min(cap);
                let start = Instant::now();
                while !self.probe_once(&c, probe).await {
                    self.still_running();
                    assert!(
                        start.elapsed() < budget,
                        "{}/{}: the {kind} did not pass within {budget:?}",
                        self.name,
                        c["name"]
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Panics if a container has exited (a pod that crashed fails at once, not at a deadline).
    fn still_running(&mut self) {
        for (c, _, p) in &mut self.running {
            if let Some(status) = p.0.try_wait().unwrap() {
                panic!("{}/{c} exited with {status} (its log is above)", self.name);
            }
        }
    }

    /// Whether the liveness probe of every container passes now.
    pub async fn alive(&self) -> bool {
        for c in self.containers("containers") {
            if let Some(probe) = c.get("livenessProbe") {
                if !self.probe_once(&c, probe).await {
                    return false;
                }
            }
        }
        true
    }

    /// Deletes the pod: SIGTERM to every container, then waits up to its
    /// terminationGracePeriodSeconds; panics if a container outlives it, or if an openinfer
    /// container stops with anything but success (others may die of the signal, as etcd does).
    pub async fn terminate(&mut self) -> Duration {
        let grace = Duration::from_secs(
            self.spec()["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        );
        let start = Instant::now();
        for (_, _, p) in &self.running {
            p.sigterm();
        }
        for (c, ours, p) in &mut self.running {
            let status = p
                .exit_within(
                    grace,
                    &format!("{}/{c} outlived its grace period", self.name),
                )
                .await;
            assert!(
                status.success() || !*ours,
                "{}/{c} exited with {status} on SIGTERM",
                self.name
            );
        }
        self.running.clear();
        start.elapsed()
    }
}

/// The kubelet's `$(VAR)` expansion: defined variables are replaced, `$$` is a `$`, anything
/// else stays as written.
pub fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(") {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&tail[..end + 3]),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

async fn grpc_serving(addr: String, service: String) -> bool {
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service })
        .await
        .is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

/// The status code of `GET path` at `addr` (HTTP/1.0, no keep-alive).
pub fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = String::new();
    BufReader::new(s).read_line(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}
