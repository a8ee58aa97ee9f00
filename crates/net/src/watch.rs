//! Following files that operators replace while the process runs (certificates that
//! cert-manager rotates, the tenants file): a poll of their contents, and `SIGHUP`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

/// How often followed files are read for changes. Kubernetes updates a mounted Secret within
/// about a minute; a second's poll of a few small files costs nothing.
pub const POLL: Duration = Duration::from_secs(1);

/// The contents of `paths` as one fingerprint (`None` for a file that cannot be read now,
/// which a replacement in progress may cause).
fn fingerprint(paths: &[PathBuf]) -> Vec<Option<u64>> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p).ok().map(|bytes| {
                let mut h = DefaultHasher::new();
                bytes.hash(&mut h);
                h.finish()
            })
        })
        .collect()
}

/// Calls `reload` whenever the contents of any of `paths` change (checked every `every`), and
/// on every `SIGHUP`. `reload` does the reading and keeps what is in force when the new files
/// do not parse. Runs until the runtime stops.
pub fn on_change(
    paths: Vec<PathBuf>,
    every: Duration,
    mut reload: impl FnMut() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = hangups();
        let mut last = fingerprint(&paths);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = fingerprint(&paths);
                    // A file missing for a moment (mid-replacement) is not a change yet.
                    if now == last || now.iter().any(Option::is_none) {
                        continue;
                    }
                    last = now;
                }
                Some(()) = next_hangup(&mut hangup) => {
                    tracing::info!("SIGHUP: reloading {paths:?}");
                    last = fingerprint(&paths);
                }
            }
            reload();
        }
    })
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
        .map_err(|e| tracing::warn!("cannot listen for SIGHUP ({e}); files are still polled"))
        .ok()
}

#[cfg(not(unix))]
fn hangups() -> Hangups {
    None
}

async fn next_hangup(h: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = h {
        return s.recv().await;
    }
    let _ = h;
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_or_sighup_calls_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _task = on_change(vec![path.clone()], Duration::from_millis(10), move || {
            let _ = tx.send(());
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "no change, no reload");
        std::fs::write(&path, "b").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("reload within 5 s")
            .unwrap();
        #[cfg(unix)]
        sighup_calls_reload_without_waiting_for_the_poll().await;
    }

    /// Run after the poll test, not beside it: the signal reaches every watcher of the
    /// process.
    #[cfg(unix)]
    async fn sighup_calls_reload_without_waiting_for_the_poll() {
        // This process handles SIGHUP from here on (its default would end the test run).
        let _handler =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // A poll an hour apart: only the signal can call reload within the test.
        let _task = on_change(vec![path], Duration::from_secs(3600), move || {
            let _ = tx.send(());
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Sent again until seen: the watcher's own handler may not be registered yet.
            let st = std::process::Command::new("kill")
                .args(["-HUP", &std::process::id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            if tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SIGHUP never reloaded"
            );
        }
    }
}
