//! A real etcd server on loopback ports for the tests, stoppable and restartable on the same
//! data directory (to cause an outage).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An etcd server owned by a test.
pub struct EtcdServer {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, with or without TLS on the client port.
    health_port: u16,
    child: Option<Child>,
    /// With TLS: the CA, server and client certificates live in `dir/certs`.
    tls: bool,
}

/// A loopback port free now (another process may take it before etcd binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The etcd binary: `OPENINFER_TEST_ETCD`, else `etcd` on the PATH.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENINFER_TEST_ETCD") {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no etcd binary: run scripts/test.sh (it installs etcd-server) or set OPENINFER_TEST_ETCD"
    );
}

impl EtcdServer {
    /// Starts a single-member cluster and waits until it answers.
    pub fn start() -> EtcdServer {
        let mut e = EtcdServer::unstarted(false);
        e.first_start();
        e
    }

    /// Starts one that speaks only TLS and requires client certificates signed by its CA
    /// (made here with openssl: `ca.pem`, `server.pem`/`server.key` for 127.0.0.1,
    /// `client.pem`/`client.key`).
    pub fn start_tls() -> EtcdServer {
        let mut e = EtcdServer::unstarted(true);
        let certs = e.certs();
        let ca = super::certs::Ca::new(&certs, "ca");
        ca.leaf("server", "serverAuth");
        ca.leaf("client", "clientAuth");
        e.first_start();
        e
    }

    /// A server with its directory and no ports yet ([`EtcdServer::first_start`] picks them).
    fn unstarted(tls: bool) -> EtcdServer {
        EtcdServer {
            dir: tempfile::tempdir().unwrap(),
            client_port: 0,
            peer_port: 0,
            health_port: 0,
            child: None,
            tls,
        }
    }

    /// Starts the server for the first time, on ports free when it is tried. Another test's
    /// process may take such a port before etcd binds it, and etcd then exits: it is started
    /// again on new ports and a fresh data directory, a few times.
    fn first_start(&mut self) {
        const ATTEMPTS: usize = 4;
        for attempt in 1..=ATTEMPTS {
            self.client_port = free_port();
            self.peer_port = free_port();
            self.health_port = free_port();
            match self.launch() {
                Ok(()) => return,
                Err(Launch::Exited(why)) if attempt < ATTEMPTS => {
                    eprintln!("etcd attempt {attempt}: {why}; again on new ports");
                    self.stop();
                    let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
                }
                Err(Launch::Exited(why) | Launch::Slow(why)) => panic!("{why}"),
            }
        }
    }

    /// Where the TLS material is.
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Freezes the server (SIGSTOP): its connections stay open and nothing answers.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("etcd is running");
        let st = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} etcd");
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and ports; waits until it answers.
    pub fn resume(&mut self) {
        if let Err(Launch::Exited(why) | Launch::Slow(why)) = self.launch() {
            panic!("{why}");
        }
    }

    /// The last lines etcd wrote to its log (`dir/etcd.log`, errors only).
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Starts etcd on the server's data and ports and waits until it is healthy.
    fn launch(&mut self) -> Result<(), Launch> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log file");
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        if self.tls {
            let c = self.certs();
            cmd.arg("--cert-file")
                .arg(c.join("server.pem"))
                .arg("--key-file")
                .arg(c.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(c.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "test", "--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.health_port),
            ])
            .args(["--election-timeout", "100", "--heartbeat-interval", "10"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        // Healthy means it has a leader and has published itself. An open port is not enough: a
        // member killed before that never becomes healthy on the same data, so a test that stops
        // a server it only saw listening would wait on an etcd that cannot come back.
        let start = Instant::now();
        while !self.healthy() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(Launch::Exited(format!(
                    "etcd exited ({status}) before it was healthy: {}",
                    self.log_tail()
                )));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(Launch::Slow(format!(
                    "etcd did not become healthy within 30s: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Whether `GET /health` says `"health":"true"`.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.health_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply.contains("\"health\":\"true\"")
    }
}

/// Why etcd did not come up.
enum Launch {
    /// It exited (a port taken, say), with what it logged.
    Exited(String),
    /// It runs but was not healthy in time.
    Slow(String),
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
