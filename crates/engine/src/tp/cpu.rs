//! The CPU collective backend: the ranks of a group, in separate processes (or threads),
//! joined in a ring over TCP. All-reduce is the ring algorithm (reduce-scatter, then
//! all-gather: each rank sends and receives `2 (n - 1) / n` of the tensor); broadcast relays
//! rank 0's bytes around the ring. Each chunk's sum is computed once and copied, so every
//! rank ends with bit-identical results and the ranks cannot drift apart.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::Communicator;
use crate::error::{EngineError, Result};

/// Largest message a rank accepts (a corrupt length must not allocate the machine away).
const MAX_MESSAGE: u64 = 1 << 32;

fn broken(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Collective(format!(
        "{what}: {e}; a rank of the tensor-parallel group is gone, so the group stops"
    ))
}

/// One rank's links: to the next rank (written by a thread of its own, so a rank can send
/// and receive at once without a deadlock) and from the previous one.
struct Ring {
    to_next: mpsc::Sender<Vec<u8>>,
    from_prev: BufReader<TcpStream>,
}

impl Ring {
    fn send(&self, bytes: Vec<u8>) -> Result<()> {
        self.to_next
            .send(bytes)
            .map_err(|_| broken("cannot send to the next rank", "its connection closed"))
    }

    fn recv(&mut self) -> Result<Vec<u8>> {
        let mut len = [0u8; 8];
        self.from_prev
            .read_exact(&mut len)
            .map_err(|e| broken("cannot read from the previous rank", e))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_MESSAGE {
            return Err(broken("the previous rank sent", format!("{len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.from_prev
            .read_exact(&mut buf)
            .map_err(|e| broken("cannot read from the previous rank", e))?;
        Ok(buf)
    }
}

/// A rank of a CPU tensor-parallel group.
pub struct CpuCommunicator {
    rank: usize,
    size: usize,
    ring: Option<Mutex<Ring>>,
    /// Says when the ring writer has sent everything queued (or lost its link): dropping
    /// the communicator waits for it, so that a last message (rank 0's stop) is not lost
    /// when the process exits right after.
    writer_done: Option<Mutex<mpsc::Receiver<()>>>,
}

/// How long dropping a communicator waits for its queued messages to go out.
const FLUSH_ON_DROP: Duration = Duration::from_secs(5);

impl Drop for CpuCommunicator {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        drop(self.ring.take());
        if let Some(Ok(done)) = self.writer_done.take().map(Mutex::into_inner) {
            let _ = done.recv_timeout(FLUSH_ON_DROP);
        }
    }
}

impl CpuCommunicator {
    /// Joins the ring: `addrs[i]` is where rank `i` listens, and `listener` is this rank's own
    /// (bound to `addrs[rank]` before the addresses were shared). Waits up to `timeout` for
    /// the neighbours.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<Self> {
        let size = addrs.len();
        if rank >= size {
            return Err(EngineError::Config(format!(
                "rank {rank} is outside a group of {size}"
            )));
        }
        if size == 1 {
            return Ok(CpuCommunicator {
                rank,
                size,
                ring: None,
                writer_done: None,
            });
        }
        let deadline = Instant::now() + timeout;
        let next_addr = addrs[(rank + 1) % size];
        // Connect first: the next rank's listener is bound, so this completes before it
        // accepts, and no two ranks wait on each other.
        let next = loop {
            match TcpStream::connect_timeout(&next_addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(broken(
                        &format!("cannot reach rank {} at {next_addr}", (rank + 1) % size),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        next.set_nodelay(true)
            .map_err(|e| broken("cannot configure the link", e))?;
        let mut hello = BufWriter::new(
            next.try_clone()
                .map_err(|e| broken("cannot configure the link", e))?,
        );
        hello
            .write_all(&[rank as u32, size as u32].map(u32::to_le_bytes).concat())
            .and_then(|()| hello.flush())
            .map_err(|e| broken("cannot greet the next rank", e))?;

        let prev = accept_until(&listener, deadline)?;
        prev.set_nodelay(true)
            .map_err(|e| broken("cannot configure the link", e))?;
        let mut from_prev = BufReader::new(prev);
        let mut hi = [0u8; 8];
        from_prev
            .read_exact(&mut hi)
            .map_err(|e| broken("the previous rank did not greet", e))?;
        let peer = u32::from_le_bytes([hi[0], hi[1], hi[2], hi[3]]) as usize;
        let peer_size = u32::from_le_bytes([hi[4], hi[5], hi[6], hi[7]]) as usize;
        if peer != (rank + size - 1) % size || peer_size != size {
            return Err(EngineError::Collective(format!(
                "rank {rank} of {size} was joined by rank {peer} of {peer_size}: the ranks disagree on the group's addresses"
            )));
        }

        let (to_next, rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let mut writer = BufWriter::new(next);
        std::thread::Builder::new()
            .name(format!("tp-ring-{rank}"))
            .spawn(move || {
                // Dropped when the thread ends, however it ends: that is the signal.
                let _done = done_tx;
                for msg in rx {
                    let len = (msg.len() as u64).to_le_bytes();
                    let sent = writer
                        .write_all(&len)
                        .and_then(|()| writer.write_all(&msg))
                        .and_then(|()| writer.flush());
                    if sent.is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| broken("cannot start the ring writer", e))?;
        Ok(CpuCommunicator {
            rank,
            size,
            ring: Some(Mutex::new(Ring { to_next, from_prev })),
            writer_done: Some(Mutex::new(writer_done)),
        })
    }

    /// A group of `n` ranks in this process, on loopback (one per thread that uses it):
    /// in-process tensor parallelism, and tests.
    pub fn local_group(n: usize, timeout: Duration) -> Result<Vec<CpuCommunicator>> {
        let listeners = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| broken("cannot listen on loopback", e))?;
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| broken("cannot listen on loopback", e))?;
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || CpuCommunicator::connect(rank, &addrs, l, timeout))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join()
                    .map_err(|_| EngineError::Collective("a rank panicked while joining".into()))?
            })
            .collect()
    }

    fn ring(&self) -> Result<std::sync::MutexGuard<'_, Ring>> {
        let ring = self
            .ring
            .as_ref()
            .ok_or_else(|| EngineError::Collective("no ring in a group of one".into()))?;
        ring.lock()
            .map_err(|_| EngineError::Collective("the ring failed earlier".into()))
    }
}

/// Accepts one connection, giving up at `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| broken("cannot poll the listener", e))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| broken("cannot configure the link", e))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(broken("the previous rank never connected", "timed out"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(broken("cannot accept the previous rank", e)),
        }
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8], want: usize) -> Result<Vec<f32>> {
    if b.len() != want * 4 {
        return Err(broken(
            "the previous rank sent a chunk of the wrong size",
            format!("{} bytes for {want} values", b.len()),
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Communicator for CpuCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = self.size;
        if n == 1 {
            return Ok(t.clone());
        }
        let (dtype, device, shape) = (t.dtype(), t.device().clone(), t.shape().clone());
        let mut data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let len = data.len();
        let bounds = |i: usize| (i * len / n, (i + 1) * len / n);
        let mut ring = self.ring()?;
        let r = self.rank;
        // Reduce-scatter: afterwards rank r holds the full sum of chunk r + 1.
        for s in 0..n - 1 {
            let (a, b) = bounds((r + n - s) % n);
            ring.send(to_bytes(&data[a..b]))?;
            let (a, b) = bounds((r + 2 * n - s - 1) % n);
            let got = from_bytes(&ring.recv()?, b - a)?;
            for (x, y) in data[a..b].iter_mut().zip(got) {
                *x += y;
            }
        }
        // All-gather: pass the finished chunks around.
        for s in 0..n - 1 {
            let (a, b) = bounds((r + 1 + n - s) % n);
            ring.send(to_bytes(&data[a..b]))?;
            let (a, b) = bounds((r + n - s) % n);
            let got = from_bytes(&ring.recv()?, b - a)?;
            data[a..b].copy_from_slice(&got);
        }
        Ok(Tensor::from_vec(data, shape, &device)?.to_dtype(dtype)?)
    }

    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        if self.size == 1 {
            return Ok(bytes.to_vec());
        }
        let mut ring = self.ring()?;
        if self.rank == 0 {
            ring.send(bytes.to_vec())?;
            return Ok(bytes.to_vec());
        }
        let got = ring.recv()?;
        if self.rank + 1 < self.size {
            ring.send(got.clone())?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::Arc;

    fn group(n: usize) -> Vec<Arc<CpuCommunicator>> {
        CpuCommunicator::local_group(n, Duration::from_secs(10))
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    #[test]
    fn ring_all_reduce_sums_exactly_on_every_rank_and_broadcast_relays() {
        for n in [1, 2, 3, 4] {
            let comms = group(n);
            // 7 values: chunks of unequal size, one empty when n > 7 would not matter.
            let results: Vec<(Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .map(|c| {
                        s.spawn(move || {
                            let r = c.rank() as f32;
                            let v: Vec<f32> = (0..7).map(|i| i as f32 + 10.0 * r).collect();
                            let t = Tensor::from_vec(v, (7,), &Device::Cpu).unwrap();
                            let sum = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                            let msg = if c.rank() == 0 {
                                b"plan".to_vec()
                            } else {
                                Vec::new()
                            };
                            (sum, c.broadcast(&msg).unwrap())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let ranks: f32 = (0..n).map(|r| 10.0 * r as f32).sum();
            let want: Vec<f32> = (0..7).map(|i| n as f32 * i as f32 + ranks).collect();
            for (rank, (sum, msg)) in results.iter().enumerate() {
                assert_eq!(sum, &want, "tp {n}, rank {rank}");
                assert_eq!(msg, b"plan", "tp {n}, rank {rank}");
            }
        }
    }

    #[test]
    fn a_lost_rank_fails_the_others_instead_of_hanging() {
        let mut comms = group(2);
        let survivor = comms.remove(0);
        drop(comms); // rank 1 goes away
        let t = Tensor::zeros((4,), DType::F32, &Device::Cpu).unwrap();
        let err = survivor.all_reduce_sum(&t).unwrap_err().to_string();
        assert!(err.contains("tensor-parallel group"), "{err}");
    }
}
