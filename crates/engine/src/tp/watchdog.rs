//! Deadlines for collectives that run where the host cannot interrupt them (NCCL kernels on
//! a GPU): a rank that dies or stops mid-collective leaves the others' kernels waiting for
//! its data for ever. Each collective is handed to a [`Watchdog`] thread as it is enqueued;
//! the caller goes on (the GPU keeps its queue full). The watchdog checks the oldest
//! collective until it finishes; if its deadline passes first, or the communicator reports an
//! error, it aborts the communicator (which ends the waiting kernels, on every rank that
//! still runs: their own watchdogs, or their next call, see the group broken) and records
//! why, so the next collective on this rank fails with that reason instead of hanging.
//!
//! The CPU ring needs none of this: a dead peer closes its TCP connection, and a read fails.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One collective in flight.
pub trait InFlight: Send {
    /// Whether it has finished; `Err` when the device reports a failure.
    fn finished(&self) -> Result<bool, String>;
}

/// What the watchdog stops: a communicator that may fail on its own and can be aborted.
pub trait Abortable: Send + Sync {
    /// An error the communicator has met in the background, if any.
    fn failure(&self) -> Option<String>;
    /// Aborts the communicator (called once).
    fn abort(&self);
}

/// How often the oldest collective is checked.
const POLL: Duration = Duration::from_millis(1);

/// Collectives queued for the watchdog before [`Watchdog::watch`] waits: a step of a large
/// model enqueues two per layer.
const QUEUE: usize = 1024;

/// Waits for `op` until `due`: `None` once it has finished, else the reason to abort (also
/// how a communicator that is made in the background is waited for).
pub fn settle(
    op: &dyn InFlight,
    comm: &dyn Abortable,
    due: Instant,
    deadline: Duration,
) -> Option<String> {
    loop {
        match op.finished() {
            Ok(true) => return None,
            Err(e) => return Some(format!("a collective failed on the device: {e}")),
            Ok(false) => {}
        }
        if let Some(e) = comm.failure() {
            return Some(format!("the communicator failed: {e}"));
        }
        if Instant::now() >= due {
            return Some(format!(
                "a collective did not finish within {deadline:?}: a rank of the group died or stopped"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// A thread that holds every collective of one communicator to its deadline.
pub struct Watchdog {
    queue: Option<SyncSender<(Box<dyn InFlight>, Instant)>>,
    broken: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `comm`: a collective not finished `deadline` after it is handed over
    /// aborts it.
    pub fn start(comm: Arc<dyn Abortable>, deadline: Duration) -> Watchdog {
        let (tx, rx) = mpsc::sync_channel::<(Box<dyn InFlight>, Instant)>(QUEUE);
        let broken = Arc::new(Mutex::new(None));
        let record = broken.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                // Collectives finish in the order they were enqueued: wait on the oldest.
                while let Ok((op, since)) = rx.recv() {
                    if let Some(why) = settle(&*op, &*comm, since + deadline, deadline) {
                        tracing::error!(reason = %why, "aborting the tensor-parallel communicator");
                        comm.abort();
                        if let Ok(mut b) = record.lock() {
                            b.get_or_insert(why);
                        }
                        return;
                    }
                }
            })
            .ok();
        Watchdog {
            queue: Some(tx),
            broken,
            thread,
        }
    }

    /// Why the communicator was aborted, once it has been.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }

    /// Hands over a collective just enqueued. Fails when the communicator was aborted.
    pub fn watch(&self, op: Box<dyn InFlight>) -> Result<(), String> {
        if let Some(why) = self.broken() {
            return Err(why);
        }
        let queue = self.queue.as_ref().ok_or("the watchdog has stopped")?;
        queue.send((op, Instant::now())).map_err(|_| {
            self.broken()
                .unwrap_or_else(|| "the watchdog has stopped".into())
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the queue ends the thread once the collectives handed over are settled.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A collective that finishes when its flag is set (a GPU kernel cannot be hung here).
    struct Op(Arc<AtomicBool>);

    impl InFlight for Op {
        fn finished(&self) -> Result<bool, String> {
            Ok(self.0.load(Ordering::SeqCst))
        }
    }

    /// A collective the device reports failed.
    struct Failed;

    impl InFlight for Failed {
        fn finished(&self) -> Result<bool, String> {
            Err("illegal address".into())
        }
    }

    #[derive(Default)]
    struct Comm {
        aborts: AtomicUsize,
        failure: Mutex<Option<String>>,
    }

    impl Abortable for Comm {
        fn failure(&self) -> Option<String> {
            self.failure.lock().unwrap().clone()
        }
        fn abort(&self) {
            self.aborts.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `dog` until it reports the communicator broken, for at most 5 s.
    fn broken_within(dog: &Watchdog, limit: Duration) -> (String, Duration) {
        let t = Instant::now();
        loop {
            if let Some(why) = dog.broken() {
                return (why, t.elapsed());
            }
            assert!(t.elapsed() < limit, "not aborted within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_collective_that_never_finishes_aborts_the_communicator_at_its_deadline() {
        let comm = Arc::new(Comm::default());
        let dog = Watchdog::start(comm.clone(), Duration::from_millis(200));
        let done = Arc::new(AtomicBool::new(true));
        dog.watch(Box::new(Op(done))).unwrap();
        dog.watch(Box::new(Op(Arc::new(AtomicBool::new(false)))))
            .unwrap();
        let (why, after) = broken_within(&dog, Duration::from_secs(5));
        assert!(why.contains("did not finish within"), "{why}");
        assert!(
            after >= Duration::from_millis(150),
            "aborted early: {after:?}"
        );
        assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
        let next = dog.watch(Box::new(Op(Arc::new(AtomicBool::new(true)))));
        assert_eq!(
            next.unwrap_err(),
            why,
            "the next collective fails with the reason"
        );
        drop(dog);
        assert_eq!(comm.aborts.load(Ordering::SeqCst), 1, "aborted once");
    }

    #[test]
    fn collectives_that_finish_leave_the_communicator_alone() {
        let comm = Arc::new(Comm::default());
        let dog = Watchdog::start(comm.clone(), Duration::from_millis(300));
        let flags: Vec<_> = (0..50).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for f in &flags {
            dog.watch(Box::new(Op(f.clone()))).unwrap();
        }
        // They finish late but within their deadline, in order.
        for f in &flags {
            f.store(true, Ordering::SeqCst);
        }
        let t = Instant::now();
        drop(dog);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "drop waited {:?}",
            t.elapsed()
        );
        assert_eq!(comm.aborts.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failure_the_communicator_reports_aborts_it_at_once() {
        let comm = Arc::new(Comm::default());
        let dog = Watchdog::start(comm.clone(), Duration::from_secs(60));
        dog.watch(Box::new(Op(Arc::new(AtomicBool::new(false)))))
            .unwrap();
        *comm.failure.lock().unwrap() = Some("remote process exited".into());
        let (why, after) = broken_within(&dog, Duration::from_secs(5));
        assert!(why.contains("remote process exited"), "{why}");
        assert!(after < Duration::from_secs(5));
        assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_device_error_aborts_the_communicator() {
        let comm = Arc::new(Comm::default());
        let dog = Watchdog::start(comm.clone(), Duration::from_secs(60));
        dog.watch(Box::new(Failed)).unwrap();
        let (why, _) = broken_within(&dog, Duration::from_secs(5));
        assert!(why.contains("illegal address"), "{why}");
        assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
    }
}
