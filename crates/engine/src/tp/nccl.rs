//! The NCCL backend (CUDA builds): the row-parallel sums run on the GPUs through NCCL
//! (cudarc's `nccl` module, via candle-core's `nccl` feature). The ranks first connect the
//! CPU ring ([`CpuCommunicator`]); rank 0 sends NCCL's unique id over it, and it keeps
//! carrying each step's plan, which lives in host memory anyway. The NCCL communicator itself
//! is made at the first all-reduce, on the stream of the tensor being reduced (the model's),
//! so that the sum is ordered after the kernels that produced it.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::DeviceRepr;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::cpu::CpuCommunicator;
use super::Communicator;
use crate::error::{EngineError, Result};

/// An NCCL communicator, used by one call at a time.
struct NcclComm(Comm);

// SAFETY: NCCL communicators may move between threads; they must not be used by two threads
// at once, which the mutex around this one guarantees.
unsafe impl Send for NcclComm {}

/// A rank of a GPU tensor-parallel group.
pub struct NcclCommunicator {
    nccl: Arc<Lazy>,
    ctrl: CpuCommunicator,
}

/// What makes the NCCL communicator, and the communicator once made.
struct Lazy {
    id: Id,
    rank: usize,
    size: usize,
    comm: Mutex<Option<NcclComm>>,
}

fn nccl_err(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Collective(format!("NCCL failed: {e:?}"))
}

impl NcclCommunicator {
    /// Agrees on an NCCL unique id over the connected CPU ring `ctrl` (rank 0 makes it).
    pub fn new(ctrl: CpuCommunicator) -> Result<Self> {
        let id = if ctrl.rank() == 0 {
            let id = Id::new().map_err(nccl_err)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            ctrl.broadcast(&bytes)?;
            id
        } else {
            let bytes = ctrl.broadcast(&[])?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(EngineError::Collective(format!(
                    "rank 0 sent an NCCL id of {} bytes",
                    bytes.len()
                )));
            }
            for (d, s) in internal.iter_mut().zip(bytes) {
                *d = s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        Ok(NcclCommunicator {
            nccl: Arc::new(Lazy {
                id,
                rank: ctrl.rank(),
                size: ctrl.size(),
                comm: Mutex::new(None),
            }),
            ctrl,
        })
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.ctrl.rank()
    }

    fn size(&self) -> usize {
        self.ctrl.size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.ctrl.all_reduce_sum(t);
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce {
            nccl: self.nccl.clone(),
        })?)
    }

    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.ctrl.broadcast(bytes)
    }
}

/// The sum of a CUDA tensor over the group, as a candle op.
struct AllReduce {
    nccl: Arc<Lazy>,
}

fn reduce<T: CudaDType + NcclType + DeviceRepr>(
    comm: &Comm,
    s: &CudaStorage,
    (start, end): (usize, usize),
) -> candle_core::Result<CudaStorage> {
    let dev = s.device().clone();
    let src = s.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: every element is written by the all-reduce before it is read.
    let mut dst = unsafe { dev.alloc::<T>(end - start)? };
    comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
        .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed: {e:?}")))?;
    Ok(CudaStorage::wrap_cuda_slice(dst, dev))
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let range = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
        let n = &self.nccl;
        let mut guard = n
            .comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("the NCCL communicator failed earlier".into()))?;
        if guard.is_none() {
            // Collective: every rank makes its communicator in the same (first) all-reduce.
            let comm = Comm::from_rank(s.device().cuda_stream(), n.rank, n.size, n.id)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL init failed: {e:?}")))?;
            *guard = Some(NcclComm(comm));
        }
        let Some(comm) = guard.as_ref() else {
            candle_core::bail!("no NCCL communicator");
        };
        let out = match s.dtype() {
            DType::F32 => reduce::<f32>(&comm.0, s, range)?,
            DType::BF16 => reduce::<bf16>(&comm.0, s, range)?,
            DType::F16 => reduce::<f16>(&comm.0, s, range)?,
            dt => candle_core::bail!("no NCCL all-reduce for {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
