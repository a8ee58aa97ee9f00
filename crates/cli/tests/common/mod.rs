//! Runs an `openinfer` benchmark command end to end and reads what it wrote.

#![allow(dead_code)]

use std::process::Command;

/// A finished run: its stdout and its output directory.
pub struct Run {
    /// What it printed.
    pub stdout: String,
    out: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

/// Runs `openinfer ARGS --out DIR` (DIR and the model cache are fresh temporary directories)
/// and asserts that it succeeded.
pub fn run(args: &[&str]) -> Run {
    run_with_env(&[], args)
}

/// [`run`] with extra environment variables (the processes it spawns inherit them).
pub fn run_with_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let done = Command::new(env!("CARGO_BIN_EXE_openinfer"))
        .env("XDG_CACHE_HOME", cache.path())
        .envs(env.iter().copied())
        .args(args)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(
        done.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
    Run {
        stdout,
        out,
        _cache: cache,
    }
}

impl Run {
    /// A JSON file it wrote.
    pub fn json(&self, name: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.out.path().join(name)).unwrap()).unwrap()
    }

    /// A text file it wrote.
    pub fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.path().join(name)).unwrap()
    }
}
