//! A minimal client of the router's OpenAI-compatible HTTP API for the benchmarks: one
//! HTTP/1.1 connection per stream (as OpenAI clients open them), the server-sent events read
//! as they arrive.

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// One open stream of `/v1/completions` events.
pub struct SseStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

/// What a stream said next.
pub enum Event {
    /// A chunk with this much text and, when it is the last of its choice, a finish reason.
    Chunk { text: usize, finished: bool },
    /// `data: [DONE]`.
    Done,
}

impl SseStream {
    /// Opens a streamed completion of `prompt` (`max_tokens` tokens, eos ignored) at `addr`.
    pub async fn completion(addr: &str, prompt: &str, max_tokens: u32) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let body = serde_json::json!({
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "stream": true,
        })
        .to_string();
        let req = hyper::Request::post("/v1/completions")
            .header("host", addr)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = send.send_request(req).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.into_body().collect().await?.to_bytes();
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
        }
        Ok(SseStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// The next event; `None` once the body ends.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                let data = event
                    .strip_prefix(b"data: ")
                    .context("an event without data")?;
                let data = &data[..data.len() - 2];
                if data == b"[DONE]" {
                    return Ok(Some(Event::Done));
                }
                let v: serde_json::Value = serde_json::from_slice(data)?;
                if let Some(e) = v.get("error") {
                    bail!("error event: {e}");
                }
                let choice = &v["choices"][0];
                return Ok(Some(Event::Chunk {
                    text: choice["text"].as_str().map_or(0, str::len),
                    finished: !choice["finish_reason"].is_null(),
                }));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
