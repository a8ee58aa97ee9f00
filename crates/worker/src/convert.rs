//! Wire ↔ engine conversions.

use openinfer_core::SequenceId;
use openinfer_engine::engine::{Capacity, EngineInfo, Finished, SequenceRequest};
use openinfer_engine::sampling::TokenLogprob;
use openinfer_engine::Tokenizer;
use openinfer_proto::worker::v1 as pb;

/// A dispatched sequence as the engine takes it (`id` is the engine's own id).
pub fn sequence_request(spec: pb::SequenceSpec, id: SequenceId) -> SequenceRequest {
    SequenceRequest {
        id,
        prompt: spec.prompt_ids,
        generated: spec.generated_ids,
        emitted_text_bytes: spec.emitted_text_bytes as usize,
        sampling: spec.sampling.unwrap_or_default().into(),
        stopping: spec.stopping.unwrap_or_default().into(),
        logprobs: spec.logprobs,
        top_logprobs: spec.top_logprobs,
        priority: spec.priority,
        cache_salt: spec.cache_salt,
    }
}

/// A finished sequence on the wire, under the router's id.
pub fn finished(f: &Finished, external: u64) -> pb::SequenceFinished {
    pb::SequenceFinished {
        sequence_id: external,
        reason: pb::FinishReason::from(f.reason) as i32,
        prompt_tokens: f.prompt_tokens as u32,
        completion_tokens: f.completion_tokens as u32,
        cached_prompt_tokens: f.cached_prompt_tokens as u32,
        message: f.message.clone(),
    }
}

/// Log-probabilities on the wire.
pub fn logprob(l: &TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token_id,
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// Capacity on the wire.
pub fn capacity(c: &Capacity) -> pb::CapacityReport {
    pb::CapacityReport {
        total_blocks: c.total_blocks as u32,
        free_blocks: c.free_blocks as u32,
        block_size: c.block_size as u32,
        max_running_sequences: c.max_running as u32,
        running_sequences: c.running as u32,
        waiting_sequences: c.waiting as u32,
        step: c.step,
        free_sequence_slots: c.free_slots() as u32,
        dispatched: 0,
        draining: false,
    }
}

/// Engine facts on the wire.
pub fn info(i: &EngineInfo) -> pb::InfoResponse {
    pb::InfoResponse {
        model: i.model.clone(),
        architecture: i.architecture.clone(),
        dtype: format!("{:?}", i.dtype).to_lowercase(),
        device: i.device.clone(),
        tp_size: i.tp_size as u32,
        vocab_size: i.vocab_size as u32,
        max_model_len: i.max_model_len as u32,
        kv: Some(pb::KvGeometry {
            block_size: i.block_size as u32,
            total_blocks: i.total_blocks as u32,
            num_layers: i.num_layers as u32,
            num_kv_heads: i.num_kv_heads as u32,
            head_dim: i.head_dim as u32,
        }),
        max_running_sequences: i.max_running as u32,
        max_batch_tokens: i.max_batch_tokens as u32,
        eos_token_ids: i.eos_token_ids.clone(),
        bos_token_id: i.bos_token_id,
        add_bos_token: i.add_bos_token,
        revision: String::new(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// The tokenizer on the wire.
pub fn tokenizer(t: &Tokenizer) -> pb::TokenizerResponse {
    pb::TokenizerResponse {
        tokenizer_json: t.inner().to_string(false).unwrap_or_default(),
        bos_token_id: t.bos_token_id,
        add_bos_token: t.add_bos_token,
        chat_template: t.chat.template.clone(),
        bos_token: t.chat.bos_token.clone(),
        eos_token: t.chat.eos_token.clone(),
    }
}
