//! `openinfer generate`: a small client that streams one answer to the terminal.

use std::io::Write;

use anyhow::Context;
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;

use crate::args::GenerateArgs;

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let uri = if a.addr.contains("://") {
            a.addr.clone()
        } else {
            format!("http://{}", a.addr)
        };
        let mut client = InferenceClient::connect(uri.clone())
            .await
            .with_context(|| format!("cannot reach the router at {uri}; is `openinfer serve` running?"))?;
        let mut request = tonic::Request::new(pb::GenerateRequest {
            model: a.model,
            prompt: a.prompt,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            stop: a.stop,
            ignore_eos: a.ignore_eos,
            priority: a.priority,
            ..Default::default()
        });
        if let Some(t) = a.timeout {
            request.set_timeout(t);
        }
        let mut stream = client.generate_stream(request).await?.into_inner();
        let mut out = std::io::stdout().lock();
        while let Some(msg) = stream.message().await? {
            out.write_all(msg.text.as_bytes())?;
            out.flush()?;
            if !msg.finish_reason.is_empty() {
                writeln!(out)?;
                out.flush()?;
                let usage = msg.usage.unwrap_or_default();
                let t = msg.timings.unwrap_or_default();
                eprintln!(
                    "[{} · {} prompt + {} generated tokens · first token {:.1} ms · total {:.1} ms · model {}]",
                    msg.finish_reason,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    t.time_to_first_token * 1e3,
                    t.total_time * 1e3,
                    msg.model,
                );
            }
        }
        anyhow::Ok(())
    })
}
