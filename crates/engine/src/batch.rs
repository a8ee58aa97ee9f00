//! The tensors of one engine step: every scheduled sequence's new tokens flattened into one
//! list, their positions and KV slots, and the attention groups that batch sequences of
//! different lengths with padding and masks.
//!
//! Sequences with one new token (decode) form one group; sequences with several (prefill
//! chunks) form another, so a long prefill chunk does not pad every decode to its length.
//! The padded layout (masks, pad/unpad indices) is built only for the general attention path;
//! the CPU's paged attention reads the block tables directly.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqChunk<'a> {
    /// Tokens to compute this step.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: how many tokens of this sequence are already in the cache.
    pub start_pos: usize,
    /// Block table covering at least `start_pos + tokens.len()` slots.
    pub block_table: &'a [u32],
    /// Whether the logits of the last token are needed (it completes the sequence's input).
    pub want_logits: bool,
}

/// Which attention path a step's groups are laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnLayout {
    /// The CPU's paged attention: slots, context and query lengths only.
    Paged,
    /// The general tensor path: also the padded layout ([`DenseLayout`]).
    Dense,
}

/// A group padded to its longest query and context, for the general attention path.
pub struct DenseLayout {
    /// `[batch * max_q]` rows of the group to place in the padded layout (`None` when
    /// `max_q == 1`, where the rows already are that layout).
    pub pad_index: Option<Tensor>,
    /// `[len]` rows of the padded layout that hold real tokens.
    pub unpad_index: Option<Tensor>,
    /// `[batch * max_ctx]` KV slots of every context position (padding reads slot 0).
    pub ctx_slots: Tensor,
    /// `[batch, 1, 1, max_q, max_ctx]` additive f32 mask (0 or -inf).
    pub mask: Tensor,
}

/// Sequences attended together.
pub struct AttnGroup {
    /// First row of the group in the flattened token list.
    pub start: usize,
    /// Rows of the group.
    pub len: usize,
    /// Sequences in the group.
    pub batch: usize,
    /// Longest query (new tokens) in the group.
    pub max_q: usize,
    /// Longest context (cached + new) in the group.
    pub max_ctx: usize,
    /// `[batch * max_ctx]` KV slots of every context position (padding reads slot 0).
    pub ctx_slots: Vec<u32>,
    /// Context length (cached + new) of each sequence.
    pub ctx_lens: Vec<u32>,
    /// New tokens (rows) of each sequence.
    pub q_lens: Vec<u32>,
    /// The padded layout, for [`AttnLayout::Dense`] only.
    pub dense: Option<DenseLayout>,
}

/// All inputs of one forward pass.
pub struct StepBatch {
    /// `[tokens]` token ids.
    pub tokens: Tensor,
    /// `[tokens]` positions.
    pub positions: Tensor,
    /// The KV slot of each token.
    pub slots: Vec<u32>,
    /// `[tokens, kv_row]` slot of each token, repeated along the row (for `scatter_set`).
    pub slot_index: Tensor,
    /// Attention groups, covering the token list in order.
    pub groups: Vec<AttnGroup>,
    /// `[n]` rows whose logits are returned, in the order of the chunks that want them.
    pub logit_rows: Tensor,
    /// Number of flattened tokens.
    pub num_tokens: usize,
}

impl StepBatch {
    /// Lays out `chunks` for `layout`. `kv_row` is `kv_heads * head_dim`; `sliding_window`
    /// limits how far back a query may attend.
    pub fn build(
        chunks: &[SeqChunk<'_>],
        block_size: usize,
        kv_row: usize,
        sliding_window: Option<usize>,
        layout: AttnLayout,
        device: &Device,
    ) -> Result<Self> {
        // Decode chunks first, then prefill chunks; both keep their given order.
        let order: Vec<usize> = (0..chunks.len())
            .filter(|&i| chunks[i].tokens.len() == 1)
            .chain((0..chunks.len()).filter(|&i| chunks[i].tokens.len() != 1))
            .collect();
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut last_row = vec![0u32; chunks.len()];
        for &i in &order {
            let c = &chunks[i];
            for (j, &t) in c.tokens.iter().enumerate() {
                let pos = c.start_pos + j;
                tokens.push(t);
                positions.push(pos as u32);
                slots.push(slot_of(c.block_table, block_size, pos));
            }
            last_row[i] = (tokens.len() - 1) as u32;
        }
        let num_tokens = tokens.len();
        let logit_rows: Vec<u32> = (0..chunks.len())
            .filter(|&i| chunks[i].want_logits)
            .map(|i| last_row[i])
            .collect();
        let slot_index: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, kv_row))
            .collect();

        let split = order
            .iter()
            .take_while(|&&i| chunks[i].tokens.len() == 1)
            .count();
        let mut groups = Vec::new();
        let mut start = 0;
        for members in [&order[..split], &order[split..]] {
            if members.is_empty() {
                continue;
            }
            let group: Vec<&SeqChunk> = members.iter().map(|&i| &chunks[i]).collect();
            let mut g = build_group(&group, start, block_size);
            if layout == AttnLayout::Dense {
                g.dense = Some(dense_layout(&g, &group, sliding_window, device)?);
            }
            start += g.len;
            groups.push(g);
        }
        Ok(StepBatch {
            tokens: Tensor::from_vec(tokens, num_tokens, device)?,
            positions: Tensor::from_vec(positions, num_tokens, device)?,
            slot_index: Tensor::from_vec(slot_index, (num_tokens, kv_row), device)?,
            slots,
            logit_rows: Tensor::from_vec(logit_rows.clone(), logit_rows.len(), device)?,
            groups,
            num_tokens,
        })
    }
}

fn slot_of(table: &[u32], block_size: usize, pos: usize) -> u32 {
    table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}

fn build_group(chunks: &[&SeqChunk<'_>], start: usize, block_size: usize) -> AttnGroup {
    let batch = chunks.len();
    let max_q = chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(1);
    let max_ctx = chunks
        .iter()
        .map(|c| c.start_pos + c.tokens.len())
        .max()
        .unwrap_or(1);
    let mut ctx_slots = Vec::with_capacity(batch * max_ctx);
    for c in chunks {
        let ctx = c.start_pos + c.tokens.len();
        ctx_slots.extend((0..max_ctx).map(|p| {
            if p < ctx {
                slot_of(c.block_table, block_size, p)
            } else {
                0
            }
        }));
    }
    AttnGroup {
        start,
        len: chunks.iter().map(|c| c.tokens.len()).sum(),
        batch,
        max_q,
        max_ctx,
        ctx_slots,
        ctx_lens: chunks
            .iter()
            .map(|c| (c.start_pos + c.tokens.len()) as u32)
            .collect(),
        q_lens: chunks.iter().map(|c| c.tokens.len() as u32).collect(),
        dense: None,
    }
}

fn dense_layout(
    g: &AttnGroup,
    chunks: &[&SeqChunk<'_>],
    window: Option<usize>,
    device: &Device,
) -> Result<DenseLayout> {
    let (batch, max_q, max_ctx) = (g.batch, g.max_q, g.max_ctx);
    let mut mask = vec![f32::NEG_INFINITY; batch * max_q * max_ctx];
    let mut pad_index = Vec::with_capacity(batch * max_q);
    let mut unpad_index = Vec::with_capacity(g.len);
    let mut row = 0u32;
    for (b, c) in chunks.iter().enumerate() {
        for qi in 0..max_q {
            let m = &mut mask[(b * max_q + qi) * max_ctx..][..max_ctx];
            if qi < c.tokens.len() {
                let pos = c.start_pos + qi;
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                m[lo..=pos].fill(0.0);
                pad_index.push(row + qi as u32);
                unpad_index.push((b * max_q + qi) as u32);
            } else {
                // Padding row: attend to one position so softmax stays finite; dropped later.
                m[0] = 0.0;
                pad_index.push(row);
            }
        }
        row += c.tokens.len() as u32;
    }
    let padded = max_q > 1;
    Ok(DenseLayout {
        pad_index: padded
            .then(|| Tensor::from_vec(pad_index, batch * max_q, device))
            .transpose()?,
        unpad_index: padded
            .then(|| Tensor::from_vec(unpad_index, g.len, device))
            .transpose()?,
        ctx_slots: Tensor::from_slice(&g.ctx_slots, batch * max_ctx, device)?,
        mask: Tensor::from_vec(mask, (batch, 1, 1, max_q, max_ctx), device)?,
    })
}
