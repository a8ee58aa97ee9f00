//! Rotary position embeddings (non-interleaved, as HF Llama's `rotate_half`), with linear and
//! Llama 3.1 frequency scaling. Tables are precomputed for every position once.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// cos/sin tables of shape `[max_positions, head_dim / 2]`.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies per rotary pair, scaling applied (HF `_compute_*_parameters`).
pub fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Factors(factors) => base
            .iter()
            .zip(factors.iter().chain(std::iter::repeat(&1.0)))
            .map(|(f, d)| f / d)
            .collect(),
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let (factor, low_freq_factor, high_freq_factor, old_len) =
                (*factor, *low_freq_factor, *high_freq_factor, *old_len);
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let out = if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    out as f32
                })
                .collect()
        }
    }
}

impl Rope {
    /// Tables for positions `0..max_positions`, in `dtype` on `device`.
    pub fn new(
        cfg: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = inverse_frequencies(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }

    /// Rows of the tables for each token's position: two `[tokens, head_dim / 2]` tensors.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` of shape `[1, tokens, heads, head_dim]` with per-token tables.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?)
    }
}
