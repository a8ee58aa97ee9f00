//! The NCCL backend (CUDA builds): the row-parallel sums run on the GPUs through NCCL
//! (cudarc's NCCL bindings, via candle-core's `nccl` feature). The ranks first connect the
//! CPU ring ([`CpuCommunicator`]); rank 0 sends NCCL's unique id over it, and it keeps
//! carrying each step's plan, which lives in host memory anyway. The NCCL communicator itself
//! is made at the first all-reduce, on the stream of the tensor being reduced (the model's),
//! so that the sum is ordered after the kernels that produced it.
//!
//! NCCL cannot hang the group: the communicator is made non-blocking, and waited for no longer
//! than [`NcclDeadlines::init`]; every all-reduce is handed to a [`Watchdog`] as it is
//! enqueued, which aborts the communicator (`ncclCommAbort`) when one is not finished within
//! [`NcclDeadlines::collective`] or NCCL reports an error. A dead rank thus stops its group
//! within seconds, as the CPU ring's closed connection does, instead of leaving the other
//! ranks' kernels waiting for its data for ever.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda::cudarc::nccl::result as nccl;
use candle_core::cuda::cudarc::nccl::safe::{Id, NcclType};
use candle_core::cuda::cudarc::nccl::sys;
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::cpu::CpuCommunicator;
use super::watchdog::{settle, Abortable, InFlight, Watchdog};
use super::Communicator;
use crate::error::{EngineError, Result};

/// How long NCCL may take before the group is aborted.
#[derive(Debug, Clone, Copy)]
pub struct NcclDeadlines {
    /// Making the communicator (every rank must join).
    pub init: Duration,
    /// One all-reduce, from its enqueueing to its end on the GPU.
    pub collective: Duration,
}

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
    deadlines: NcclDeadlines,
    made: Mutex<Option<Made>>,
}

/// A communicator and the watchdog over its collectives (dropped first).
struct Made {
    watchdog: Watchdog,
    comm: Arc<RawComm>,
    /// [`NcclDeadlines::collective`].
    collective: Duration,
}

/// An NCCL communicator handle. Calls on it are serialized by its mutex: the engine's
/// enqueueing and the watchdog's abort. Once aborted (or destroyed) the handle is gone.
struct RawComm(Mutex<Option<CommHandle>>);

/// `ncclComm_t`, which may move between threads (never used by two at once: see [`RawComm`]).
struct CommHandle(sys::ncclComm_t);
// SAFETY: NCCL communicators may be used from any thread, one call at a time.
unsafe impl Send for CommHandle {}

impl RawComm {
    /// Runs `f` on the handle; an error once the communicator has been aborted.
    fn with<T>(&self, f: impl FnOnce(sys::ncclComm_t) -> Result<T>) -> Result<T> {
        let guard = self
            .0
            .lock()
            .map_err(|_| collective("the NCCL communicator failed earlier"))?;
        match guard.as_ref() {
            Some(h) => f(h.0),
            None => Err(collective("the NCCL communicator was aborted")),
        }
    }

    /// NCCL's state of the communicator: `Ok(true)` while an operation is still in progress.
    fn in_progress(&self) -> Result<bool> {
        self.with(|c| {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `c` is a live communicator; `state` is written by the call.
            unsafe { sys::ncclCommGetAsyncError(c, &mut state) }
                .result()
                .map_err(nccl_err)?;
            match state.result() {
                Ok(nccl::NcclStatus::InProgress) => Ok(true),
                Ok(_) => Ok(false),
                Err(e) => Err(nccl_err(e)),
            }
        })
    }
}

impl Abortable for RawComm {
    fn failure(&self) -> Option<String> {
        self.in_progress().err().map(|e| e.to_string())
    }

    fn abort(&self) {
        if let Ok(mut guard) = self.0.lock() {
            if let Some(h) = guard.take() {
                // SAFETY: the handle is live and, taken out, used by no one after this.
                let _ = unsafe { nccl::comm_abort(h.0) };
            }
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.0.lock() {
            if let Some(h) = guard.take() {
                // SAFETY: the last owner; every collective was settled by the watchdog first.
                let _ = unsafe { nccl::comm_destroy(h.0) };
            }
        }
    }
}

/// A non-blocking communicator still being made (the watchdog's [`settle`] waits on it).
struct Making<'a>(&'a RawComm);

impl InFlight for Making<'_> {
    fn finished(&self) -> std::result::Result<bool, String> {
        self.0.in_progress().map(|p| !p).map_err(|e| e.to_string())
    }
}

/// An all-reduce enqueued on a stream: finished when the event after it is.
struct Enqueued(CudaEvent);

impl InFlight for Enqueued {
    fn finished(&self) -> std::result::Result<bool, String> {
        self.0.try_is_complete().map_err(|e| format!("{e:?}"))
    }
}

fn collective(msg: &str) -> EngineError {
    EngineError::Collective(msg.to_string())
}

fn nccl_err(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Collective(format!("NCCL failed: {e:?}"))
}

/// NCCL's config for a non-blocking communicator (NCCL_CONFIG_INITIALIZER, blocking off).
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // The layout of the bindings' header (NCCL 2.30); newer libraries read older layouts.
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

impl NcclCommunicator {
    /// Agrees on an NCCL unique id over the connected CPU ring `ctrl` (rank 0 makes it).
    pub fn new(ctrl: CpuCommunicator, deadlines: NcclDeadlines) -> Result<Self> {
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
                deadlines,
                made: Mutex::new(None),
            }),
            ctrl,
        })
    }
}

impl Lazy {
    /// Makes this rank's communicator on `stream`'s device: collective, so every rank does it
    /// in the same (first) all-reduce. Aborted if the group is not complete by the deadline.
    fn make(&self, stream: &CudaStream) -> Result<Made> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| collective(&format!("CUDA context: {e:?}")))?;
        let mut handle = std::mem::MaybeUninit::uninit();
        let mut config = non_blocking_config();
        let id = sys::ncclUniqueId {
            internal: *self.id.internal(),
        };
        // SAFETY: `handle` and `config` outlive the call; NCCL writes the handle.
        unsafe {
            nccl::comm_init_rank_config(
                handle.as_mut_ptr(),
                self.size as i32,
                id,
                self.rank as i32,
                &mut config,
            )
        }
        .map_err(nccl_err)?;
        // SAFETY: written by a call that succeeded (or is in progress in the background).
        let comm = Arc::new(RawComm(Mutex::new(Some(CommHandle(unsafe {
            handle.assume_init()
        })))));
        let init = self.deadlines.init;
        if let Some(why) = settle(&Making(&comm), &*comm, Instant::now() + init, init) {
            comm.abort();
            return Err(EngineError::Collective(format!(
                "the NCCL communicator was not made ({why}); every rank of the group must start within {init:?}"
            )));
        }
        Ok(Made {
            watchdog: Watchdog::start(comm.clone(), self.deadlines.collective),
            comm,
            collective: self.deadlines.collective,
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

/// Enqueues the sum of `s`'s values in `start..end` on `stream` and hands it to the
/// watchdog.
fn reduce<T: CudaDType + NcclType + DeviceRepr>(
    made: &Made,
    stream: &Arc<CudaStream>,
    s: &CudaStorage,
    (start, end): (usize, usize),
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let src = s.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: every element is written by the all-reduce before it is read.
    let mut dst = unsafe { dev.alloc::<T>(end - start)? };
    let status = {
        let (src_ptr, _src_sync) = src.device_ptr(stream);
        let (dst_ptr, _dst_sync) = dst.device_ptr_mut(stream);
        made.comm.with(|c| {
            // SAFETY: both buffers hold `end - start` values on this stream's device, and
            // stay alive until the stream has run the all-reduce (candle frees them in
            // stream order).
            unsafe {
                nccl::all_reduce(
                    src_ptr as *const _,
                    dst_ptr as *mut _,
                    end - start,
                    T::as_nccl_type(),
                    sys::ncclRedOp_t::ncclSum,
                    c,
                    stream.cu_stream() as _,
                )
            }
            .map_err(nccl_err)
        })?
    };
    if status == nccl::NcclStatus::InProgress {
        // A non-blocking communicator may still be enqueueing: the event goes after it.
        let d = made.collective;
        if let Some(why) = settle(&Making(&made.comm), &*made.comm, Instant::now() + d, d) {
            made.comm.abort();
            return Err(collective(&why));
        }
    }
    let event = stream
        .record_event(None)
        .map_err(|e| collective(&format!("CUDA event: {e:?}")))?;
    made.watchdog
        .watch(Box::new(Enqueued(event)))
        .map_err(|why| collective(&why))?;
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
        let stream = s.device().cuda_stream();
        let mut guard = n
            .made
            .lock()
            .map_err(|_| candle_core::Error::Msg("the NCCL communicator failed earlier".into()))?;
        if guard.is_none() {
            *guard = Some(n.make(&stream).map_err(candle_core::Error::wrap)?);
        }
        let Some(made) = guard.as_ref() else {
            candle_core::bail!("no NCCL communicator");
        };
        let out = match s.dtype() {
            DType::F32 => reduce::<f32>(made, &stream, s, range),
            DType::BF16 => reduce::<bf16>(made, &stream, s, range),
            DType::F16 => reduce::<f16>(made, &stream, s, range),
            dt => candle_core::bail!("no NCCL all-reduce for {dt:?}"),
        }
        .map_err(candle_core::Error::wrap)?;
        Ok((out, l.shape().clone()))
    }
}
