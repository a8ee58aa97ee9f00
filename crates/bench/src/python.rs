//! The Python side of benchmarks: HF transformers baselines run by scripts in `scripts/`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// Threads for a baseline: `threads`, or every core.
pub fn threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `scripts/SCRIPT --model MODEL --threads THREADS` plus each `(flag, value)` of
/// `settings` with `python`, and returns the JSON object on the last line of its output that
/// starts with `{`; `None`, with a warning, when `python` does not exist.
pub fn run_script(
    python: &Path,
    script: &str,
    model: &Path,
    threads: usize,
    settings: &[(&str, String)],
) -> anyhow::Result<Option<serde_json::Value>> {
    if !python.exists() {
        tracing::warn!(
            python = %python.display(),
            "no Python with torch + transformers; skipping the HF baseline (run scripts/setup-reference-venv.sh)"
        );
        return Ok(None);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    tracing::info!(script, "running the HF transformers baseline");
    let mut cmd = Command::new(python);
    cmd.arg(&path)
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()]);
    for (flag, value) in settings {
        cmd.arg(flag).arg(value);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{script} printed no JSON"))?;
    Ok(Some(serde_json::from_str(line)?))
}
