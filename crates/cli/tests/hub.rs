//! `--model org/name[@revision][:FILE]` downloads from the Hugging Face Hub with `hf-hub`,
//! honouring `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`. The Hub here is a server on loopback
//! that serves fixture repositories in the Hub's URL layout (`/api/models/{repo}/revision/{rev}`
//! and `/{repo}/resolve/{rev}/{file}` with ranged reads, `ETag` and `X-Repo-Commit`), and
//! refuses any request without the right bearer token, as a gated repository does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const TOKEN: &str = "hf_test_token_1234";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Repositories: name → (file name → bytes).
type Repos = HashMap<String, Vec<(String, Vec<u8>)>>;

struct Hub {
    url: String,
    /// Paths requested, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

fn repos() -> Repos {
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut dir: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures().join("llama"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read(p.clone()),
            )
        })
        .collect();
    dir.push(("README.md".into(), b"# tiny llama\n".to_vec()));
    let gguf = vec![
        (
            "tiny-llama-F32.gguf".to_string(),
            read(fixtures().join("gguf/llama.gguf")),
        ),
        (
            "tiny-qwen3-F32.gguf".to_string(),
            read(fixtures().join("gguf/qwen3.gguf")),
        ),
    ];
    HashMap::from([
        ("openinfer-test/tiny-llama".to_string(), dir),
        ("openinfer-test/tiny-gguf".to_string(), gguf),
    ])
}

fn start_hub() -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let repos = Arc::new(repos());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (repos, seen) = (repos.clone(), seen2.clone());
            std::thread::spawn(move || {
                let _ = serve(conn, &repos, &seen);
            });
        }
    });
    Hub { url, seen }
}

fn respond(
    mut conn: &TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

fn serve(conn: TcpStream, repos: &Repos, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    seen.lock().unwrap().push(path.clone());
    if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        return respond(
            &conn,
            "401 Unauthorized",
            &[],
            b"{\"error\":\"Invalid credentials\"}",
        );
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (repo, _rev) = rest.split_once("/revision/").unwrap_or((rest, "main"));
        let Some(files) = repos.get(repo) else {
            return respond(
                &conn,
                "404 Not Found",
                &[],
                b"{\"error\":\"Repository not found\"}",
            );
        };
        let siblings: Vec<String> = files
            .iter()
            .map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return respond(
            &conn,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let file = match parts.as_slice() {
        [org, name, "resolve", _rev, file] => repos
            .get(&format!("{org}/{name}"))
            .and_then(|fs| fs.iter().find(|(f, _)| f == file)),
        _ => None,
    };
    let Some((name, bytes)) = file else {
        return respond(&conn, "404 Not Found", &[], b"Entry not found");
    };
    let size = bytes.len();
    let (start, end) = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(size.saturating_sub(1));
            (a.min(size), (b + 1).min(size))
        })
        .unwrap_or((0, size));
    // An etag per file content, as the Hub gives (a hash of the bytes).
    let etag = format!("{:016x}{:08x}", fnv(bytes), name.len());
    respond(
        &conn,
        "206 Partial Content",
        &[
            ("ETag", format!("\"{etag}\"")),
            ("X-Repo-Commit", COMMIT.into()),
            (
                "Content-Range",
                format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
            ),
        ],
        &bytes[start..end],
    )?;
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    Ok(())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// `openinfer perplexity` over the fixture text with the Hub environment given.
fn perplexity(model: &str, env: &[(&str, String)], out: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openinfer"));
    cmd.args([
        "perplexity",
        "--model",
        model,
        "--context",
        "64",
        "--max-windows",
        "2",
    ])
    .arg("--text")
    .arg(fixtures().join("text/prose.txt"))
    .arg("--json")
    .arg(out)
    .env_remove("HF_TOKEN")
    .env_remove("HF_ENDPOINT")
    .env_remove("HF_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ppl(out: &Path) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn a_hub_id_downloads_through_hf_endpoint_with_hf_token_into_hf_home() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HF_ENDPOINT", hub.url.clone()),
        ("HF_TOKEN", TOKEN.to_string()),
        ("HF_HOME", home.path().display().to_string()),
    ];
    let out = home.path().join("hub.json");
    let run = perplexity("openinfer-test/tiny-llama@v1", &env, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let snapshot = home.path().join(format!(
        "hub/models--openinfer-test--tiny-llama/snapshots/{COMMIT}"
    ));
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(snapshot.join(f).exists(), "{f} in the HF_HOME cache");
    }
    assert!(
        !snapshot.join("README.md").exists(),
        "only the files a model needs"
    );
    let seen = hub.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|p| p == "/api/models/openinfer-test/tiny-llama/revision/v1"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|p| p.contains("/resolve/v1/model.safetensors")),
        "{seen:?}"
    );
    // The same model as the local directory.
    let local = home.path().join("local.json");
    let run = perplexity(&fixtures().join("llama").display().to_string(), &[], &local);
    assert!(run.status.success());
    assert_eq!(ppl(&out), ppl(&local));

    // A GGUF file picked by its tag, from the same Hub.
    let out = home.path().join("gguf.json");
    let run = perplexity("openinfer-test/tiny-gguf:QWEN3", &env, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let local = home.path().join("local-gguf.json");
    let run = perplexity(
        &fixtures().join("gguf/qwen3.gguf").display().to_string(),
        &[],
        &local,
    );
    assert!(run.status.success());
    assert_eq!(ppl(&out), ppl(&local));
}

#[test]
fn a_missing_or_wrong_token_and_an_unknown_file_fail_with_what_to_do() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("x.json");
    for token in [None, Some("hf_wrong")] {
        let mut env = vec![
            ("HF_ENDPOINT", hub.url.clone()),
            ("HF_HOME", home.path().display().to_string()),
        ];
        if let Some(t) = token {
            env.push(("HF_TOKEN", t.to_string()));
        }
        let run = perplexity("openinfer-test/tiny-llama", &env, &out);
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("HF_TOKEN"), "{err}");
        assert!(!err.contains(TOKEN), "the token is never printed");
    }
    let env = [
        ("HF_ENDPOINT", hub.url.clone()),
        ("HF_TOKEN", TOKEN.to_string()),
        ("HF_HOME", home.path().display().to_string()),
    ];
    let run = perplexity("openinfer-test/tiny-gguf:Q4_K_M", &env, &out);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("tiny-qwen3-F32.gguf"),
        "the error lists the files there are: {err}"
    );
}
