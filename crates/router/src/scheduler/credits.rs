//! Each worker's credit ledger (ARCHITECTURE §2): what it reported free after its last step,
//! less what was sent since and not yet acknowledged, plus what preempted sequences are about
//! to free. Workers are peers, not trusted: a report that contradicts what was sent to the
//! worker is refused with the reason, and the worker is disconnected.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use openinfer_proto::worker::v1 as wpb;

use super::pace::StepClock;
use crate::models::ModelSpec;

/// A sequence running on a worker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Running {
    pub priority: i32,
    /// Dispatch order, to preempt the newest first.
    pub order: u64,
    pub preempting: bool,
}

/// One worker connection's ledger.
pub(super) struct Credits {
    pub addr: String,
    pub spec: Arc<ModelSpec>,
    pub capacity: wpb::CapacityReport,
    /// Sequences sent on this connection.
    pub sent: u64,
    /// Blocks asked for by the sequences the worker has not acknowledged yet, in send order.
    pub in_flight: VecDeque<usize>,
    /// Sequences running there that the router still waits on.
    pub running: HashMap<u64, Running>,
    /// Every sequence sent there whose end the worker has not reported yet (running ones and
    /// ones the router cancelled): a worker may speak of these and no others.
    pub given: HashSet<u64>,
    /// Sequences preempted to make room, with the KV blocks they hold, until the worker
    /// reports them gone: their slots and blocks count as free already.
    pub releasing: Vec<(u64, i64)>,
    /// Left the registry: gets no new sequences, and no longer counts as serving its model.
    pub leaving: bool,
    /// Asked to close (a leaving worker with nothing left running there).
    pub closing: bool,
    /// Its step time, from its step messages.
    pub clock: StepClock,
}

impl Credits {
    pub fn new(addr: String, spec: Arc<ModelSpec>, capacity: wpb::CapacityReport) -> Credits {
        Credits {
            addr,
            spec,
            capacity,
            sent: 0,
            in_flight: VecDeque::new(),
            running: HashMap::new(),
            given: HashSet::new(),
            releasing: Vec::new(),
            leaving: false,
            closing: false,
            clock: StepClock::default(),
        }
    }

    fn unacked(&self) -> i64 {
        self.sent as i64 - self.capacity.dispatched as i64
    }

    /// Sequence slots the router may still fill.
    pub fn free_slots(&self) -> i64 {
        self.capacity.free_sequence_slots as i64 + self.releasing.len() as i64 - self.unacked()
    }

    /// KV blocks the router may still ask for.
    pub fn free_blocks(&self) -> i64 {
        let releasing: i64 = self.releasing.iter().map(|&(_, b)| b).sum();
        self.capacity.free_blocks as i64 + releasing - self.in_flight.iter().sum::<usize>() as i64
    }

    /// Running sequences against the worker's limit.
    pub fn load(&self) -> f64 {
        self.running.len() as f64 / self.capacity.max_running_sequences.max(1) as f64
    }

    /// Blocks a sequence of `tokens` tokens needs here.
    pub fn blocks(&self, tokens: usize) -> i64 {
        tokens.div_ceil(self.spec.block_size) as i64
    }

    /// Records a dispatch of `id`, which asks for `blocks`.
    pub fn sent_one(&mut self, id: u64, blocks: usize, running: Running) {
        self.sent += 1;
        self.in_flight.push_back(blocks);
        self.running.insert(id, running);
        self.given.insert(id);
    }

    /// Takes the worker's capacity report after a step. A report that acknowledges more
    /// sequences than were sent, or fewer than an earlier report did, is refused.
    pub fn report(&mut self, cap: wpb::CapacityReport) -> Result<(), String> {
        if cap.dispatched > self.sent {
            return Err(format!(
                "it acknowledged {} sequences on this connection, but {} were sent",
                cap.dispatched, self.sent
            ));
        }
        if cap.dispatched < self.capacity.dispatched {
            return Err(format!(
                "its acknowledgements went back from {} to {}",
                self.capacity.dispatched, cap.dispatched
            ));
        }
        // Bounded by what was sent (checked above): in_flight holds one entry per sequence
        // sent and not acknowledged.
        let acked = (cap.dispatched - self.capacity.dispatched) as usize;
        self.in_flight.drain(..acked.min(self.in_flight.len()));
        self.capacity = cap;
        Ok(())
    }

    /// Checks that the worker may speak of sequence `id`.
    pub fn knows(&self, id: u64) -> Result<(), String> {
        if self.given.contains(&id) {
            Ok(())
        } else {
            Err(format!("it reported on sequence {id}, which it was never given (or which had already ended)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::spec;

    fn ledger() -> Credits {
        let cap = wpb::CapacityReport {
            free_blocks: 100,
            total_blocks: 100,
            free_sequence_slots: 4,
            max_running_sequences: 4,
            ..Default::default()
        };
        Credits::new("w".into(), spec("m", 16), cap)
    }

    fn running() -> Running {
        Running {
            priority: 0,
            order: 0,
            preempting: false,
        }
    }

    #[test]
    fn sent_sequences_hold_credits_until_the_worker_acknowledges_them() {
        let mut w = ledger();
        w.sent_one(1, 3, running());
        w.sent_one(2, 5, running());
        assert_eq!((w.free_slots(), w.free_blocks()), (2, 92));
        // The worker took the first one: its report already counts its blocks as used.
        let cap = wpb::CapacityReport {
            dispatched: 1,
            free_blocks: 97,
            free_sequence_slots: 3,
            ..w.capacity
        };
        w.report(cap).unwrap();
        assert_eq!((w.free_slots(), w.free_blocks()), (2, 92));
        assert_eq!(w.in_flight.len(), 1);
    }

    #[test]
    fn a_report_that_contradicts_what_was_sent_is_refused_and_changes_nothing() {
        let mut w = ledger();
        w.sent_one(1, 3, running());
        // A forged count: more than was ever sent (no loop runs on it).
        let forged = wpb::CapacityReport {
            dispatched: u64::MAX,
            ..w.capacity
        };
        let e = w.report(forged).unwrap_err();
        assert!(e.contains("but 1 were sent"), "{e}");
        assert_eq!((w.capacity.dispatched, w.in_flight.len()), (0, 1));
        w.report(wpb::CapacityReport {
            dispatched: 1,
            ..w.capacity
        })
        .unwrap();
        let back = wpb::CapacityReport {
            dispatched: 0,
            ..w.capacity
        };
        assert!(w.report(back).unwrap_err().contains("went back"));
        assert!(w.knows(1).is_ok());
        assert!(w.knows(7).unwrap_err().contains("never given"));
    }
}
