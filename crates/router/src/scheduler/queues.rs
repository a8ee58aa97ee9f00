//! The priority queue of one model: FIFO within a priority level, higher levels first, with
//! aging so that a request that waits long enough overtakes newer higher-priority ones.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// A queued request, as the queue sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Request id.
    pub id: u64,
    /// Its priority level.
    pub priority: i32,
    /// When it was first queued (kept across preemptions, so resumed work keeps its place).
    pub enqueued: Instant,
    /// Tokens it brings (prompt + already generated), counted against the token budget.
    pub tokens: usize,
}

impl Entry {
    /// Priority after aging: one level per `aging_step` waited.
    pub fn effective_priority(&self, now: Instant, aging_step: Option<Duration>) -> i64 {
        let boost = match aging_step {
            Some(step) if !step.is_zero() => {
                (now.saturating_duration_since(self.enqueued).as_nanos() / step.as_nanos()) as i64
            }
            _ => 0,
        };
        self.priority as i64 + boost
    }
}

/// Queued requests of one model, by priority level.
#[derive(Debug, Default)]
pub struct PriorityQueue {
    levels: BTreeMap<i32, VecDeque<Entry>>,
    len: usize,
    tokens: usize,
}

impl PriorityQueue {
    /// Requests queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens queued.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Requests queued at `priority`.
    pub fn level_len(&self, priority: i32) -> usize {
        self.levels.get(&priority).map_or(0, VecDeque::len)
    }

    /// Requests a new one of `priority` would wait behind (its queue position from 0).
    pub fn ahead_of(&self, priority: i32) -> usize {
        self.levels.range(priority..).map(|(_, l)| l.len()).sum()
    }

    /// The requests a new one of `priority` would wait behind, in the order they would run
    /// (higher levels first, then first come; aging aside).
    pub fn ahead(&self, priority: i32) -> impl Iterator<Item = u64> + '_ {
        self.levels
            .range(priority..)
            .rev()
            .flat_map(|(_, l)| l.iter().map(|e| e.id))
    }

    /// Requests queued per priority level, lowest level first.
    pub fn levels(&self) -> impl Iterator<Item = (i32, usize)> + '_ {
        self.levels.iter().map(|(&p, l)| (p, l.len()))
    }

    /// Queues a new request behind the others of its level.
    pub fn push_back(&mut self, e: Entry) {
        self.len += 1;
        self.tokens += e.tokens;
        self.levels.entry(e.priority).or_default().push_back(e);
    }

    /// Queues a preempted request at the head of its level, where its age puts it.
    pub fn push_resumed(&mut self, e: Entry) {
        self.len += 1;
        self.tokens += e.tokens;
        let level = self.levels.entry(e.priority).or_default();
        let at = level.partition_point(|x| x.enqueued <= e.enqueued);
        level.insert(at, e);
    }

    /// The request to run next: highest effective priority, oldest first among equals.
    pub fn peek(&self, now: Instant, aging_step: Option<Duration>) -> Option<Entry> {
        // The head of each level is its oldest and so its most aged entry.
        self.levels
            .values()
            .filter_map(|l| l.front())
            .max_by(|a, b| {
                a.effective_priority(now, aging_step)
                    .cmp(&b.effective_priority(now, aging_step))
                    .then(b.enqueued.cmp(&a.enqueued))
            })
            .copied()
    }

    /// Removes `id` (queued at `priority`).
    pub fn remove(&mut self, id: u64, priority: i32) -> Option<Entry> {
        let level = self.levels.get_mut(&priority)?;
        let i = level.iter().position(|e| e.id == id)?;
        let e = level.remove(i)?;
        if level.is_empty() {
            self.levels.remove(&priority);
        }
        self.len -= 1;
        self.tokens -= e.tokens;
        Some(e)
    }

    /// The request to shed first: the newest at the lowest level, if that level is below
    /// `below`.
    pub fn shed_candidate(&self, below: i32) -> Option<Entry> {
        let (&p, level) = self.levels.iter().next()?;
        (p < below).then(|| level.back().copied()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, priority: i32, enqueued: Instant) -> Entry {
        Entry {
            id,
            priority,
            enqueued,
            tokens: 1,
        }
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        q.push_back(entry(1, 0, t));
        q.push_back(entry(2, 5, t + Duration::from_millis(1)));
        q.push_back(entry(3, 0, t + Duration::from_millis(2)));
        q.push_back(entry(4, 5, t + Duration::from_millis(3)));
        let mut order = Vec::new();
        while let Some(e) = q.peek(t, None) {
            order.push(e.id);
            q.remove(e.id, e.priority);
        }
        assert_eq!(order, [2, 4, 1, 3]);
        assert_eq!((q.len(), q.tokens()), (0, 0));
    }

    #[test]
    fn aging_lets_an_old_low_priority_request_overtake_newer_high_priority_ones() {
        let t = Instant::now();
        let at = |secs| t + Duration::from_secs(secs);
        let order = |step| {
            let mut q = PriorityQueue::default();
            q.push_back(entry(1, 0, t));
            q.push_back(entry(2, 5, at(3)));
            q.push_back(entry(3, 5, at(5)));
            let mut order = Vec::new();
            while let Some(e) = q.peek(at(5), step) {
                order.push(e.id);
                q.remove(e.id, e.priority);
            }
            order
        };
        // Aged one level a second, the 5 s old request ties with the new priority-5 one and
        // wins as the older; the one queued 2 s earlier is still ahead of both.
        assert_eq!(order(Some(Duration::from_secs(1))), [2, 1, 3]);
        assert_eq!(order(None), [2, 3, 1]);
    }

    #[test]
    fn resumed_requests_keep_their_place_and_shedding_takes_the_newest_lowest() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        q.push_back(entry(2, 0, t + Duration::from_millis(2)));
        q.push_resumed(entry(1, 0, t));
        q.push_back(entry(3, -1, t + Duration::from_millis(3)));
        q.push_back(entry(4, -1, t + Duration::from_millis(4)));
        assert_eq!(q.peek(t, None).unwrap().id, 1);
        assert_eq!(q.shed_candidate(0).unwrap().id, 4);
        assert_eq!(q.shed_candidate(-1), None);
        assert_eq!(q.level_len(-1), 2);
    }
}
