//! `openinfer perplexity`: a model's perplexity over a text file, by llama.cpp's method, to
//! compare the formats of one model (f32, bf16, Q8_0, Q4_K, ...) with each other and with
//! `llama-perplexity`.

use anyhow::Context;
use openinfer_engine::perplexity::perplexity;
use openinfer_engine::ModelDir;

use crate::args::PerplexityArgs;
use crate::commands::engine_config;

/// Scores the text and prints the result (and writes it as JSON with `--json`).
pub fn run(a: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("cannot read --text {}", a.text.display()))?;
    let cfg = engine_config(&a.engine)?;
    let model = super::resolve_model(&a.model)?;
    let dir = ModelDir::open(&model)
        .with_context(|| format!("cannot open the model {}", model.display()))?;
    let pb = openinfer_bench::progress::bar(0, "windows");
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let p = perplexity(&dir, &cfg, &text, a.context, a.max_windows, &progress)?;
    pb.finish_and_clear();
    println!(
        "perplexity {:.4} ± {:.4} over {} tokens ({} windows of {}; text {} tokens; mean NLL {:.5})",
        p.perplexity, p.perplexity_stderr, p.scored_tokens, p.windows, p.context, p.text_tokens, p.mean_nll
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&p)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    Ok(())
}
