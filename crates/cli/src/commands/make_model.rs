//! `openinfer make-model`.

use anyhow::{bail, Context};
use openinfer_engine::make_model::{make_model, ModelSpec, PRESETS};
use openinfer_engine::Architecture;

use crate::args::MakeModelArgs;

pub fn run(a: MakeModelArgs) -> anyhow::Result<()> {
    let spec = spec(&a)?;
    let pb = openinfer_bench::progress::bytes_bar(0, "writing");
    make_model(&spec, &a.out, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })
    .with_context(|| format!("cannot write the model to {}", a.out.display()))?;
    pb.finish_and_clear();
    tracing::info!(out = %a.out.display(), preset = %a.preset, "model written");
    Ok(())
}

/// The preset with the explicit shape flags applied.
pub fn spec(a: &MakeModelArgs) -> anyhow::Result<ModelSpec> {
    let Some(mut s) = ModelSpec::preset(&a.preset) else {
        bail!(
            "--preset {}: unknown; choose one of {}",
            a.preset,
            PRESETS.join(", ")
        );
    };
    if let Some(arch) = &a.architecture {
        s.architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => bail!("--architecture {other}: use llama, mistral, qwen2 or qwen3"),
        };
    }
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut s.hidden_size, a.hidden_size);
    set(&mut s.intermediate_size, a.intermediate_size);
    set(&mut s.num_layers, a.layers);
    set(&mut s.num_heads, a.heads);
    set(&mut s.num_kv_heads, a.kv_heads);
    set(&mut s.vocab_size, a.vocab_size);
    set(&mut s.max_position_embeddings, a.max_position_embeddings);
    if let Some(d) = &a.dtype {
        s.dtype = d.clone();
    }
    if let Some(t) = a.tie_embeddings {
        s.tie_word_embeddings = t;
    }
    if let Some(m) = a.max_shard_size {
        s.max_shard_bytes = m;
    }
    s.seed = a.seed;
    Ok(s)
}
