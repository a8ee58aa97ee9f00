//! `openinfer serve` with no model makes the `tiny` demo model and serves it; `openinfer
//! generate` streams an answer from it, configured by flags or by `OPENINFER_*` variables;
//! SIGTERM stops it.

mod common;

use std::process::Command;

#[test]
fn serve_makes_the_demo_model_and_generate_streams_from_it() {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.env("XDG_CACHE_HOME", cache.path());
    let (mut serve, addr) =
        common::spawn_command("serve", cmd.args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(cache.path().join("openinfer/tiny/config.json").exists());

    let out = Command::new(common::bin())
        .args([
            "generate",
            "--addr",
            &addr,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "Hello",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[length · "), "{stderr}");
    assert!(stderr.contains("+ 8 generated tokens"), "{stderr}");
    assert!(!out.stdout.is_empty());

    // The same through environment variables, and a refusal explained.
    let out = Command::new(common::bin())
        .args(["generate", "Hello"])
        .env("OPENINFER_ADDR", &addr)
        .env("OPENINFER_MAX_NEW_TOKENS", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("max_new_tokens: must be at least 1"),
        "{stderr}"
    );

    // SIGTERM stops it cleanly: router drained, then the embedded worker.
    serve.sigterm();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "serve still running 10 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "serve exit status {status}");
}
