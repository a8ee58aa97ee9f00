//! The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) over a paged KV cache.
//!
//! One [`Llama::forward`] runs every scheduled token of a step: projections and MLPs over the
//! flattened token list, attention per [`AttnGroup`](crate::batch::AttnGroup). Weights of a
//! GGUF file stay in their quantized formats unless a dtype is asked for; their products run
//! on candle's quantized kernels.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor, D};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use rayon::prelude::*;

use crate::batch::{AttnGroup, AttnLayout, SeqChunk, StepBatch};
use crate::block_matmul::{BlockFormat, BlockMatmul};
use crate::config::ModelConfig;
use crate::cpu_attention::PagedAttention;
use crate::cpu_ops::{add_rms_norm, SiluMul};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model_dir::Weights;
use crate::packed_matmul::{PackedMatmul, PackedWeight};
use crate::rope::Rope;
use crate::sampling;
use crate::tp::{Communicator, Shard};

/// Whether the CPU kernels (packed matmul, paged attention, fused SiLU·up) serve this
/// device and compute dtype; everything else takes candle's general path. On CPU the compute
/// dtype is always f32; half-precision weights stay half in packed panels.
fn uses_cpu_kernels(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// A weight matrix `[out, in]`: packed once for the CPU kernel, a plain tensor for the device's
/// own matmul otherwise, or quantized as a GGUF file stores it.
enum Weight {
    Packed(PackedWeight),
    Tensor(Tensor),
    Quantized(QMatMul),
    /// Fused projections whose parts are stored in different formats (a Q4_K_M file keeps
    /// some `v` projections in Q6_K): each part's output, concatenated.
    Split(Vec<Weight>),
}

impl Weight {
    fn new(w: Tensor) -> Result<Self> {
        if w.device().is_cpu() {
            let (n, k) = w.dims2()?;
            let flat = w.flatten_all()?;
            let packed = match w.dtype() {
                DType::F32 => Some(PackedWeight::pack(&flat.to_vec1()?, n, k)),
                DType::BF16 => Some(PackedWeight::pack_bf16(&flat.to_vec1()?, n, k)),
                DType::F16 => Some(PackedWeight::pack_f16(&flat.to_vec1()?, n, k)),
                _ => None,
            };
            if let Some(p) = packed {
                return Ok(Weight::Packed(p));
            }
        }
        Ok(Weight::Tensor(w))
    }

    /// Bytes the matrix takes in memory: what one product reads.
    fn bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Weight::Packed(p) => p.n() * p.k() * p.dtype().size_in_bytes(),
            Weight::Tensor(t) => dense(t),
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => dense(t),
            Weight::Split(parts) => parts.iter().map(Weight::bytes).sum(),
        }
    }

    /// `x [m, in]` → `[m, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Packed(p) => x.contiguous()?.apply_op1_no_bwd(&PackedMatmul(p))?,
            Weight::Tensor(w) => x.matmul(&w.t()?)?,
            Weight::Quantized(QMatMul::QTensor(q)) if x.device().is_cpu() => {
                let x = x.contiguous()?;
                match BlockFormat::of(q.dtype()) {
                    Some(format) => x.apply_op1_no_bwd(&BlockMatmul { format, w: q })?,
                    // Many rows (prefill) without the project's kernels: one dense product of
                    // the weights dequantized for this call beats candle's dot product per row
                    // and column. The weights stay quantized in memory.
                    None if x.dim(0)? >= dense_rows(q.dtype()) => {
                        x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?
                    }
                    None => QMatMul::QTensor(q.clone()).forward(&x)?,
                }
            }
            Weight::Quantized(q) => q.forward(&x.contiguous()?)?,
            Weight::Split(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)?
            }
        })
    }
}

/// Rows of input from which a quantized matrix the project's kernels do not serve
/// ([`BlockFormat`]: other formats, or a CPU without AVX-512) is dequantized for the call and
/// multiplied densely rather than by candle block by block: 32, or 2 for the formats candle
/// computes one value at a time on x86 (Q4_1, Q5_0, Q5_1).
pub fn dense_rows(format: GgmlDType) -> usize {
    match format {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2,
        _ => 32,
    }
}

/// Stacks the rows of quantized matrices of one format (whole blocks per row, so the bytes
/// concatenate as they are).
fn stack_rows(parts: &[QTensor]) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let cols = parts[0].shape().dims2()?.1;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        rows += p.shape().dims2()?.0;
        bytes.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// The token embedding: a dense table, or rows dequantized on lookup from a quantized one.
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// Rows of `tokens`, in `dtype`.
    fn lookup(&self, tokens: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.index_select(tokens, 0)?,
            Embedding::Quantized(q) => q.embedding(tokens)?,
        }
        .to_dtype(dtype)?)
    }
}

/// The precisions a model is loaded in.
#[derive(Debug, Clone, Copy)]
pub struct Precision {
    /// Activations, norms, biases, rotary tables and the KV cache.
    pub compute: DType,
    /// Weight matrices and the embedding (on CPU, packed panels of this dtype).
    pub weights: DType,
    /// The quantized tensors of a GGUF file stay in their formats.
    pub keep_quantized: bool,
}

/// `y = x W^T (+ b)`.
struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// Per-head RMSNorm weights of queries and keys (Qwen3).
    qk_norm: Option<(Tensor, Tensor)>,
    /// q, k and v projections fused into one matrix.
    qkv: Linear,
    o: Linear,
    /// gate and up projections fused into one matrix.
    gate_up: Linear,
    down: Linear,
}

/// A loaded model, or one rank's shard of it.
pub struct Llama {
    /// The shape this rank computes with (its heads, KV heads and MLP width).
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Weight,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Sums the row-parallel projections over the group (`None`: the whole model is here).
    comm: Option<Arc<dyn Communicator>>,
    /// Bytes of weights this rank holds.
    weight_bytes: usize,
}

/// One projection's rows: `len` rows from `start` of a `[rows, cols]` tensor.
struct Rows {
    name: String,
    rows: usize,
    start: usize,
    len: usize,
}

/// Loads tensors, or this rank's slices of them, and counts the bytes it holds.
struct Loader<'a> {
    weights: &'a Weights,
    /// Compute dtype: norms and biases.
    dtype: DType,
    /// Weight matrices and the embedding.
    weight_dtype: DType,
    device: &'a Device,
    bytes: Cell<usize>,
    /// Quantized tensors stay quantized (a GGUF file loaded without a dtype, on one rank).
    quantized: bool,
}

impl Loader<'_> {
    /// The quantized form of `name`, when it is kept quantized.
    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        if !self.quantized {
            return Ok(None);
        }
        let q = self.weights.quantized(name, shape)?;
        if let Some(q) = &q {
            self.bytes.set(self.bytes.get() + q.storage_size_in_bytes());
        }
        Ok(q)
    }

    fn count(&self, t: Tensor) -> Tensor {
        self.bytes
            .set(self.bytes.get() + t.elem_count() * t.dtype().size_in_bytes());
        t
    }

    /// A norm or bias, in the compute dtype.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.load(name, shape, self.dtype, self.device)?;
        Ok(self.count(t))
    }

    /// The dtype matrices `names` (the parts of one fused matrix) are loaded in: as a GGUF
    /// file stores them when its tensors stay as stored and all are in the same half
    /// precision, else the weight dtype.
    fn matrix_dtype(&self, names: &[&str]) -> DType {
        if !self.quantized {
            return self.weight_dtype;
        }
        let stored = names.iter().map(|n| self.weights.stored_half(n));
        match stored.reduce(|a, b| if a == b { a } else { None }) {
            Some(Some(half)) => half,
            _ => self.weight_dtype,
        }
    }

    /// A weight matrix, in its [`Loader::matrix_dtype`].
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = self.matrix_dtype(&[name]);
        let t = self.weights.load(name, shape, dtype, self.device)?;
        Ok(self.count(t))
    }

    /// Part of a tensor in `dtype`, as [`Weights::load_slice`] takes it.
    #[allow(clippy::too_many_arguments)]
    fn slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = self
            .weights
            .load_slice(name, shape, dim, start, len, dtype, self.device)?;
        Ok(self.count(t))
    }

    /// Column-parallel: each part's rows (and bias rows), concatenated (fused projections).
    fn column_parallel(&self, parts: &[Rows], cols: usize, bias: bool) -> Result<Linear> {
        let whole = parts.iter().all(|p| p.start == 0 && p.len == p.rows);
        if whole && self.quantized {
            let qs = parts
                .iter()
                .map(|p| self.quantized(&p.name, &[p.rows, cols]))
                .collect::<Result<Vec<_>>>()?;
            if let Some(qs) = qs.into_iter().collect::<Option<Vec<QTensor>>>() {
                let w = if qs.iter().all(|q| q.dtype() == qs[0].dtype()) {
                    Weight::Quantized(QMatMul::from_qtensor(stack_rows(&qs)?)?)
                } else {
                    Weight::Split(
                        qs.into_iter()
                            .map(|q| Ok(Weight::Quantized(QMatMul::from_qtensor(q)?)))
                            .collect::<Result<Vec<_>>>()?,
                    )
                };
                let b = if bias {
                    let bs = parts
                        .iter()
                        .map(|p| self.get(&p.name.replace(".weight", ".bias"), &[p.rows]))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&bs, 0)?)
                } else {
                    None
                };
                return Ok(Linear { w, b });
            }
        }
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        let matrix_dtype = self.matrix_dtype(&names);
        let cat = |bias: bool| -> Result<Tensor> {
            let ts = parts
                .iter()
                .map(|p| {
                    if bias {
                        let name = p.name.replace(".weight", ".bias");
                        self.slice(&name, &[p.rows], 0, p.start, p.len, self.dtype)
                    } else {
                        self.slice(&p.name, &[p.rows, cols], 0, p.start, p.len, matrix_dtype)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&ts, 0)?)
        };
        Ok(Linear {
            w: Weight::new(cat(false)?)?,
            b: if bias { Some(cat(true)?) } else { None },
        })
    }

    /// Row-parallel: columns `start..start + len` of `[rows, cols]`; the bias is whole, as
    /// it is added once, after the all-reduce.
    fn row_parallel(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
        (start, len): (usize, usize),
        bias: bool,
    ) -> Result<Linear> {
        let quantized = match start == 0 && len == cols {
            true => self.quantized(name, &[rows, cols])?,
            false => None,
        };
        let w = match quantized {
            Some(q) => Weight::Quantized(QMatMul::from_qtensor(q)?),
            None => {
                let dtype = self.matrix_dtype(&[name]);
                Weight::new(self.slice(name, &[rows, cols], 1, start, len, dtype)?)?
            }
        };
        let b = if bias {
            Some(self.get(&name.replace(".weight", ".bias"), &[rows])?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl Llama {
    /// Loads every weight of `shard` (everything for [`Shard::SINGLE`]), checking shapes
    /// against `cfg`, the whole model's shape. `comm` joins the shards of a group.
    /// `progress` is told after each layer. With `precision.keep_quantized`, the quantized
    /// tensors of a GGUF file stay in their formats (on one rank; a shard dequantizes its
    /// slices).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        cfg: &ModelConfig,
        shard: Shard,
        comm: Option<Arc<dyn Communicator>>,
        weights: &Weights,
        precision: Precision,
        device: &Device,
        max_positions: usize,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        let dtype = precision.compute;
        let l = Loader {
            weights,
            dtype,
            weight_dtype: precision.weights,
            device,
            bytes: Cell::new(0),
            quantized: precision.keep_quantized && shard.size == 1,
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_rows, kv_rows) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let inter = cfg.intermediate_size;
        let (q0, nq) = shard.heads(cfg);
        let (kv0, nkv) = shard.kv_heads(cfg);
        let (m0, nm) = shard.mlp(cfg);
        let steps = cfg.num_layers + 2;
        let embed_name = "model.embed_tokens.weight";
        let embed = match l.quantized(embed_name, &[cfg.vocab_size, h])? {
            Some(q) => Embedding::Quantized(Arc::new(q)),
            None => Embedding::Dense(l.matrix(embed_name, &[cfg.vocab_size, h])?),
        };
        progress(1, steps);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let rows = |s: &str, rows: usize, start: usize, len: usize| Rows {
                name: format!("{p}.{s}.weight"),
                rows,
                start,
                len,
            };
            let qkv = l.column_parallel(
                &[
                    rows("self_attn.q_proj", q_rows, q0 * hd, nq * hd),
                    rows("self_attn.k_proj", kv_rows, kv0 * hd, nkv * hd),
                    rows("self_attn.v_proj", kv_rows, kv0 * hd, nkv * hd),
                ],
                h,
                cfg.qkv_bias,
            )?;
            let gate_up = l.column_parallel(
                &[
                    rows("mlp.gate_proj", inter, m0, nm),
                    rows("mlp.up_proj", inter, m0, nm),
                ],
                h,
                cfg.mlp_bias,
            )?;
            let qk_norm = if cfg.qk_norm {
                Some((
                    l.get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                    l.get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                qk_norm,
                input_norm: l.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: l.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qkv,
                o: l.row_parallel(
                    &format!("{p}.self_attn.o_proj.weight"),
                    (h, q_rows),
                    (q0 * hd, nq * hd),
                    cfg.o_bias,
                )?,
                gate_up,
                down: l.row_parallel(
                    &format!("{p}.mlp.down_proj.weight"),
                    (h, inter),
                    (m0, nm),
                    cfg.mlp_bias,
                )?,
            });
            progress(i + 2, steps);
        }
        let norm = l.get("model.norm.weight", &[h])?;
        let lm_head = match (&embed, cfg.tie_word_embeddings) {
            (Embedding::Dense(e), true) => Weight::new(e.clone())?,
            (Embedding::Quantized(q), true) => Weight::Quantized(QMatMul::from_arc(q.clone())?),
            (_, false) => match l.quantized("lm_head.weight", &[cfg.vocab_size, h])? {
                Some(q) => Weight::Quantized(QMatMul::from_qtensor(q)?),
                None => Weight::new(l.matrix("lm_head.weight", &[cfg.vocab_size, h])?)?,
            },
        };
        progress(steps, steps);
        let local = shard.local_config(cfg);
        Ok(Llama {
            rope: Rope::new(&local, max_positions, dtype, device)?,
            cfg: local,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            comm,
            weight_bytes: l.bytes.get(),
        })
    }

    /// Bytes of weights this rank holds (the shard, plus the replicated tensors).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weight matrices one decode step reads: every layer's projections and the
    /// output head, in the format they are held in (quantized blocks, half or f32).
    pub fn step_weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.w.bytes() + l.o.w.bytes() + l.gate_up.w.bytes() + l.down.w.bytes())
            .sum();
        layers + self.lm_head.bytes()
    }

    /// `x W^T`, summed over the group, plus the bias: a row-parallel projection.
    fn reduced(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        let y = l.w.forward(x)?;
        let y = match &self.comm {
            Some(c) => c.all_reduce_sum(&y)?,
            None => y,
        };
        Ok(match &l.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Lays out one step's `chunks` for this model's attention path (paged on CPU, padded
    /// elsewhere).
    pub fn step_batch(&self, chunks: &[SeqChunk<'_>], block_size: usize) -> Result<StepBatch> {
        let layout = if uses_cpu_kernels(&self.device, self.dtype) {
            AttnLayout::Paged
        } else {
            AttnLayout::Dense
        };
        StepBatch::build(
            chunks,
            block_size,
            self.cfg.num_kv_heads * self.cfg.head_dim,
            self.cfg.sliding_window,
            layout,
            &self.device,
        )
    }

    /// Runs one step. Writes the new tokens' K/V into `kv` and returns f32 logits
    /// `[logit_rows, vocab]`.
    ///
    /// A whole model on CPU runs the step on a thread of rayon's pool: its many parallel
    /// products (several per layer) then start on the thread that asks for them, with the
    /// other threads stealing work, instead of waking the pool and putting this thread to
    /// sleep for each one (which cost about a third of a single decode's time on 2 cores).
    /// The other threads spin for the length of the step rather than sleep between its calls
    /// ([`crate::pool::hot`]).
    /// A shard of a tensor-parallel group does not: it blocks in collectives, and ranks that
    /// share a process would hold every thread of the pool waiting for one another.
    pub fn forward(&self, batch: &StepBatch, kv: &KvCache) -> Result<Tensor> {
        if self.comm.is_none() && self.device.is_cpu() {
            crate::pool::hot(|| self.forward_here(batch, kv))
        } else {
            self.forward_here(batch, kv)
        }
    }

    /// [`Llama::forward`] on the calling thread.
    fn forward_here(&self, batch: &StepBatch, kv: &KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let t = batch.num_tokens;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin) = self.rope.gather(&batch.positions)?;
        let mut x = self.embed.lookup(&batch.tokens, self.dtype)?;
        // Each residual sum is normed in the same pass (by the next norm: the next layer's
        // input norm or, after the last, the final norm).
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        let mut h = rms_norm(&x, first_norm, eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv.narrow(1, 0, nh * hd)?.reshape((1, t, nh, hd))?;
            let k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((1, t, nkv, hd))?;
            let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?;
            let (q, k) = match &layer.qk_norm {
                Some((qn, kn)) => (
                    rms_norm(&q.contiguous()?, qn, eps)?,
                    rms_norm(&k.contiguous()?, kn, eps)?,
                ),
                None => (q, k),
            };
            let q = self.rope.apply(&q, &cos, &sin)?.reshape((t, nh, hd))?;
            let k = self.rope.apply(&k, &cos, &sin)?.reshape((t, nkv * hd))?;
            kv.write(i, &k, &v, &batch.slots, &batch.slot_index)?;
            let attn = batch
                .groups
                .iter()
                .map(|g| self.attend(&q, kv, i, g))
                .collect::<Result<Vec<_>>>()?;
            let attn = match <[Tensor; 1]>::try_from(attn) {
                Ok([one]) => one,
                Err(groups) => Tensor::cat(&groups, 0)?,
            };
            let o = self.reduced(&layer.o, &attn)?;
            (x, h) = add_rms_norm(&x, &o, &layer.post_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            let inter = cfg.intermediate_size;
            let act = if uses_cpu_kernels(&self.device, self.dtype) {
                gu.apply_op1_no_bwd(&SiluMul)?
            } else {
                (gu.narrow(1, 0, inter)?.silu()? * gu.narrow(1, inter, inter)?)?
            };
            let d = self.reduced(&layer.down, &act)?;
            let next_norm = self.layers.get(i + 1).map_or(&self.norm, |l| &l.input_norm);
            (x, h) = add_rms_norm(&x, &d, next_norm, eps)?;
        }
        if batch.logit_rows.dim(0)? == 0 {
            // Only prefill chunks that do not finish their prompt: nothing to sample.
            return Ok(Tensor::zeros(
                (0, cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let x = h.index_select(&batch.logit_rows, 0)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Attention of one group. `q` is `[tokens, heads, head_dim]`; returns
    /// `[group.len, heads * head_dim]`.
    fn attend(&self, q: &Tensor, kv: &KvCache, layer: usize, g: &AttnGroup) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rep = nh / nkv;
        let (b, mq, mc) = (g.batch, g.max_q, g.max_ctx);
        let q = q.narrow(0, g.start, g.len)?;
        let Some(dense) = &g.dense else {
            let (k, v) = kv.layer(layer);
            let op = PagedAttention {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                ctx_slots: &g.ctx_slots,
                ctx_lens: &g.ctx_lens,
                q_lens: &g.q_lens,
                max_ctx: g.max_ctx,
                window: cfg.sliding_window,
            };
            return Ok(q
                .reshape((g.len, nh * hd))?
                .contiguous()?
                .apply_op3_no_bwd(k, v, &op)?);
        };
        let q = match &dense.pad_index {
            Some(ix) => q.index_select(ix, 0)?,
            None => q,
        };
        // [b, mq, nkv, rep, hd] → [b, nkv, rep * mq, hd]: each KV head serves its query heads
        // in one matmul, without repeating K/V.
        let q = q
            .reshape((b, mq, nkv, rep, hd))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, nkv, rep * mq, hd))?;
        let (k, v) = kv.gather(layer, &dense.ctx_slots, self.dtype)?;
        let k = k.reshape((b, mc, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, mc, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(DType::F32)?
            .reshape((b, nkv, rep, mq, mc))?
            .broadcast_add(&dense.mask)?;
        let probs =
            softmax_last_dim(&scores)?
                .to_dtype(self.dtype)?
                .reshape((b, nkv, rep * mq, mc))?;
        let out = probs
            .matmul(&v)?
            .reshape((b, nkv, rep, mq, hd))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?
            .reshape((b * mq, nh * hd))?;
        Ok(match &dense.unpad_index {
            Some(ix) => out.index_select(ix, 0)?,
            None => out,
        })
    }
}

/// Index of the largest value in each row of `[n, vocab]` logits (the first on ties):
/// greedy choice on the device. f32 logits on CPU are read in place, rows in parallel,
/// sixteen lanes at a time ([`sampling::argmax`]): candle's reduction took one thread
/// about 1.7 ms for 16 rows of a 49,152-token vocabulary while the pool waited.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    if let (Device::Cpu, DType::F32, Ok((_, vocab @ 1..))) =
        (logits.device(), logits.dtype(), logits.dims2())
    {
        let (storage, layout) = logits.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(v[a..b].par_chunks(vocab).map(sampling::argmax).collect());
        }
    }
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_rows_agrees_with_candle_in_place_and_on_strided_logits() {
        let (rows, vocab) = (7, 1000);
        // Values in a few hundred distinct steps: ties within rows, the first must win.
        let v: Vec<f32> = (0..rows * vocab)
            .map(|i| (crate::sampling::mix(3, i as u64) % 400) as f32 / 8.0 - 25.0)
            .collect();
        let logits = Tensor::from_vec(v, (rows, vocab), &Device::Cpu).unwrap();
        let want = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(argmax_rows(&logits).unwrap(), want);
        // Rows 2..5 of the same storage, and a transposed view (not contiguous: candle's).
        let part = logits.narrow(0, 2, 3).unwrap();
        assert_eq!(argmax_rows(&part).unwrap(), want[2..5]);
        let t = logits.t().unwrap();
        let want_t = t.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(argmax_rows(&t).unwrap(), want_t);
    }
}
