//! Small fused CPU kernels for element-wise work that general tensor ops would do on strided
//! views (slowly) or in several passes.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// The values of a CPU kernel's input: f32 and contiguous, or an error naming `op`.
pub(crate) fn f32_input<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("{op}: f32 input only")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only")
    };
    Ok(&x[start..end])
}

/// `silu(gate) * up` over the fused `[m, 2 * inter]` output of the gate/up projection
/// (gate in the first half of each row), giving `[m, inter]`. f32 on CPU.
pub struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(self.name(), s, l)?;
        let (m, width) = l.shape().dims2()?;
        if width % 2 != 0 {
            candle_core::bail!("silu-mul: odd width {width}")
        }
        let inter = width / 2;
        let mut out = vec![0f32; m * inter];
        out.par_chunks_mut(inter)
            .zip(x.par_chunks(width))
            .for_each(|(o, row)| {
                let (gate, up) = row.split_at(inter);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((m, inter))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn silu_mul_matches_tensor_ops() {
        let x = Tensor::arange(-40f32, 40f32, &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap()
            .reshape((4, 20))
            .unwrap();
        let fused = x.apply_op1_no_bwd(&SiluMul).unwrap();
        let want =
            (x.narrow(1, 0, 10).unwrap().silu().unwrap() * x.narrow(1, 10, 10).unwrap()).unwrap();
        let diff = (fused - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
