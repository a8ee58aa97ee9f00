//! The priority queue of one model: higher levels first, with aging so that a request that
//! waits long enough overtakes newer higher-priority ones; inside a level, tenants share by
//! weight through virtual token counters (Sheng et al., "Fairness in Serving Large Language
//! Models", OSDI 2024), and each tenant's requests go first come, first served.
//!
//! A tenant's counter grows with the service it gets, divided by its weight: prompt tokens
//! when a request is dispatched, output tokens as they come (each weighted, see
//! [`RouterConfig`](crate::config::RouterConfig)). The next request of a level comes from its
//! waiting tenant with the lowest counter. A tenant that had nothing waiting is lifted to the
//! lowest counter of those waiting (or, with none waiting, to that of the last one served),
//! so idle time cannot be banked and spent later as a burst.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A queued request, as the queue sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Request id.
    pub id: u64,
    /// Its priority level.
    pub priority: i32,
    /// When it was first queued (kept across preemptions, so resumed work keeps its place).
    pub enqueued: Instant,
    /// Tokens it brings (prompt + already generated), counted against the token budget.
    pub tokens: usize,
    /// Its tenant.
    pub tenant: Arc<str>,
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

/// One priority level: each tenant's waiting requests, oldest first.
#[derive(Debug, Default)]
struct Level {
    tenants: BTreeMap<Arc<str>, VecDeque<Entry>>,
    len: usize,
}

/// Queued requests of one model, by priority level, and its tenants' virtual counters.
#[derive(Debug, Default)]
pub struct PriorityQueue {
    levels: BTreeMap<i32, Level>,
    len: usize,
    tokens: usize,
    /// Virtual token counter of each tenant that has used this model (service / weight).
    counters: HashMap<Arc<str>, f64>,
    /// Requests waiting per tenant (all levels): the tenants "active" for lifting.
    waiting: HashMap<Arc<str>, usize>,
    /// The counter of the tenant served last (the lift when no one waits).
    last_served: f64,
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
        self.levels.get(&priority).map_or(0, |l| l.len)
    }

    /// The virtual counter of `tenant` (0 for one never served).
    pub fn counter(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// Requests a new one of `tenant` at `priority` would wait behind, in the order they
    /// would run, aging aside: every request of higher levels, then in its own level its
    /// tenant's, and of each other tenant as many as it has itself plus one (the turns
    /// taken in between, weights aside).
    pub fn ahead<'a>(&'a self, priority: i32, tenant: &'a str) -> impl Iterator<Item = u64> + 'a {
        let higher = self
            .levels
            .range(priority.saturating_add(1)..)
            .rev()
            .flat_map(|(_, l)| l.tenants.values().flatten().map(|e| e.id));
        let own = self.levels.get(&priority).into_iter().flat_map(move |l| {
            let mine = l.tenants.get(tenant).map_or(0, VecDeque::len);
            l.tenants.iter().flat_map(move |(t, q)| {
                let take = if t.as_ref() == tenant { mine } else { mine + 1 };
                q.iter().take(take).map(|e| e.id)
            })
        });
        higher.chain(own)
    }

    /// How many requests [`ahead`](Self::ahead) lists.
    pub fn ahead_of(&self, priority: i32, tenant: &str) -> usize {
        self.ahead(priority, tenant).count()
    }

    /// Requests queued per priority level, lowest level first.
    pub fn levels(&self) -> impl Iterator<Item = (i32, usize)> + '_ {
        self.levels.iter().map(|(&p, l)| (p, l.len))
    }

    /// A tenant with nothing waiting is lifted before its request joins the queue.
    fn arrive(&mut self, tenant: &Arc<str>) {
        if self.waiting.get(tenant).copied().unwrap_or(0) == 0 {
            let floor = self
                .waiting
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(t, _)| self.counter(t))
                .reduce(f64::min)
                .unwrap_or(self.last_served);
            let c = self.counters.entry(tenant.clone()).or_insert(0.0);
            *c = c.max(floor);
        }
        *self.waiting.entry(tenant.clone()).or_insert(0) += 1;
    }

    fn insert(&mut self, e: Entry, at: impl FnOnce(&VecDeque<Entry>) -> usize) {
        self.arrive(&e.tenant);
        self.len += 1;
        self.tokens += e.tokens;
        let level = self.levels.entry(e.priority).or_default();
        level.len += 1;
        let q = level.tenants.entry(e.tenant.clone()).or_default();
        let i = at(q);
        q.insert(i, e);
    }

    /// Queues a new request behind the others of its tenant and level.
    pub fn push_back(&mut self, e: Entry) {
        self.insert(e, VecDeque::len);
    }

    /// Queues a preempted request where its age puts it among its tenant's at its level.
    pub fn push_resumed(&mut self, e: Entry) {
        let enqueued = e.enqueued;
        self.insert(e, |q| q.partition_point(|x| x.enqueued <= enqueued));
    }

    /// The request to run next: highest effective priority; inside a level, the oldest of
    /// the tenant with the lowest counter. Among equal counters (a tenant just lifted ties
    /// with the lowest), the tenant with fewer requests waiting goes first, then the older
    /// head.
    pub fn peek(&self, now: Instant, aging_step: Option<Duration>) -> Option<Entry> {
        self.levels
            .values()
            .filter_map(|l| {
                l.tenants
                    .iter()
                    .filter_map(|(t, q)| q.front().map(|e| (self.counter(t), q.len(), e)))
                    .min_by(|(ca, na, a), (cb, nb, b)| {
                        ca.total_cmp(cb)
                            .then(na.cmp(nb))
                            .then(a.enqueued.cmp(&b.enqueued))
                    })
                    .map(|(_, _, e)| e)
            })
            .max_by(|a, b| {
                a.effective_priority(now, aging_step)
                    .cmp(&b.effective_priority(now, aging_step))
                    .then(b.enqueued.cmp(&a.enqueued))
            })
            .cloned()
    }

    /// Removes `id` (queued at `priority` for `tenant`).
    pub fn remove(&mut self, id: u64, priority: i32, tenant: &str) -> Option<Entry> {
        let level = self.levels.get_mut(&priority)?;
        let q = level.tenants.get_mut(tenant)?;
        let i = q.iter().position(|e| e.id == id)?;
        let e = q.remove(i)?;
        if q.is_empty() {
            level.tenants.remove(tenant);
        }
        level.len -= 1;
        if level.len == 0 {
            self.levels.remove(&priority);
        }
        self.len -= 1;
        self.tokens -= e.tokens;
        if let Some(n) = self.waiting.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(tenant);
            }
        }
        Some(e)
    }

    /// Adds `service` (already weighted and divided by the tenant's weight) to `tenant`'s
    /// counter.
    pub fn charge(&mut self, tenant: &Arc<str>, service: f64) {
        let c = self.counters.entry(tenant.clone()).or_insert(0.0);
        *c += service;
        self.last_served = *c;
    }

    /// The newest request of the tenant with the most requests at `priority`, when that
    /// tenant holds more than `tenant` would with one more (its fair share of a full level).
    pub fn over_share(&self, priority: i32, tenant: &str) -> Option<Entry> {
        let level = self.levels.get(&priority)?;
        let mine = level.tenants.get(tenant).map_or(0, VecDeque::len);
        let (_, most) = level
            .tenants
            .iter()
            .filter(|(t, _)| t.as_ref() != tenant)
            .max_by_key(|(_, q)| q.len())?;
        (most.len() > mine + 1)
            .then(|| most.back().cloned())
            .flatten()
    }

    /// The request to shed first: the newest at the lowest level, if that level is below
    /// `below`.
    pub fn shed_candidate(&self, below: i32) -> Option<Entry> {
        let (&p, level) = self.levels.iter().next()?;
        if p >= below {
            return None;
        }
        level
            .tenants
            .values()
            .filter_map(VecDeque::back)
            .max_by_key(|e| e.enqueued)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, priority: i32, enqueued: Instant) -> Entry {
        tenant_entry(id, priority, enqueued, "a")
    }

    fn tenant_entry(id: u64, priority: i32, enqueued: Instant, tenant: &str) -> Entry {
        Entry {
            id,
            priority,
            enqueued,
            tokens: 1,
            tenant: tenant.into(),
        }
    }

    fn drain(q: &mut PriorityQueue, now: Instant, step: Option<Duration>) -> Vec<u64> {
        let mut order = Vec::new();
        while let Some(e) = q.peek(now, step) {
            order.push(e.id);
            q.remove(e.id, e.priority, &e.tenant);
        }
        order
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        q.push_back(entry(1, 0, t));
        q.push_back(entry(2, 5, t + Duration::from_millis(1)));
        q.push_back(entry(3, 0, t + Duration::from_millis(2)));
        q.push_back(entry(4, 5, t + Duration::from_millis(3)));
        assert_eq!(drain(&mut q, t, None), [2, 4, 1, 3]);
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
            drain(&mut q, at(5), step)
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
        q.push_back(tenant_entry(4, -1, t + Duration::from_millis(4), "b"));
        assert_eq!(q.peek(t, None).unwrap().id, 1);
        assert_eq!(q.shed_candidate(0).unwrap().id, 4);
        assert_eq!(q.shed_candidate(-1), None);
        assert_eq!(q.level_len(-1), 2);
    }

    /// Serves the queue as a model would: each dispatched request costs `cost` of its
    /// tenant divided by its weight. Returns the tenants in the order served.
    fn serve(
        q: &mut PriorityQueue,
        t: Instant,
        n: usize,
        weight: &dyn Fn(&str) -> f64,
    ) -> Vec<String> {
        let mut served = Vec::new();
        for _ in 0..n {
            let Some(e) = q.peek(t, None) else { break };
            q.remove(e.id, e.priority, &e.tenant);
            q.charge(&e.tenant, 10.0 / weight(&e.tenant));
            served.push(e.tenant.to_string());
        }
        served
    }

    #[test]
    fn tenants_of_one_level_share_by_weight_whatever_their_arrival_order() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        // The heavy tenant queued 100 requests first; the light one 10 after it.
        for i in 0..100 {
            q.push_back(tenant_entry(i, 0, t, "heavy"));
        }
        for i in 100..110 {
            q.push_back(tenant_entry(i, 0, t + Duration::from_millis(1), "light"));
        }
        let served = serve(&mut q, t, 20, &|_| 1.0);
        let light = served.iter().filter(|s| *s == "light").count();
        assert_eq!(light, 10, "equal weights alternate: {served:?}");

        let mut q = PriorityQueue::default();
        for i in 0..100 {
            q.push_back(tenant_entry(i, 0, t, "a"));
            q.push_back(tenant_entry(1000 + i, 0, t, "b"));
        }
        let served = serve(&mut q, t, 90, &|n| if n == "a" { 2.0 } else { 1.0 });
        let a = served.iter().filter(|s| *s == "a").count();
        assert_eq!(a, 60, "weight 2 gets two turns to weight 1's one");
    }

    #[test]
    fn a_tenant_back_from_idle_cannot_spend_banked_time() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        for i in 0..50 {
            q.push_back(tenant_entry(i, 0, t, "busy"));
        }
        serve(&mut q, t, 40, &|_| 1.0);
        // Idle all along, `late` arrives now with 10 requests: it is lifted to `busy`'s
        // counter and alternates with it, not served alone until it catches up.
        for i in 100..110 {
            q.push_back(tenant_entry(i, 0, t, "late"));
        }
        assert_eq!(q.counter("late"), q.counter("busy"));
        let served = serve(&mut q, t, 10, &|_| 1.0);
        let late = served.iter().filter(|s| *s == "late").count();
        assert!((4..=6).contains(&late), "{served:?}");
    }

    #[test]
    fn with_no_one_waiting_a_newcomer_is_lifted_to_the_last_served() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        q.push_back(tenant_entry(1, 0, t, "a"));
        serve(&mut q, t, 1, &|_| 1.0);
        q.push_back(tenant_entry(2, 0, t, "b"));
        assert_eq!(q.counter("b"), 10.0);
    }

    #[test]
    fn a_tenant_that_holds_most_of_a_full_level_gives_way() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        for i in 0..5 {
            q.push_back(tenant_entry(i, 0, t + Duration::from_millis(i), "heavy"));
        }
        assert_eq!(q.over_share(0, "light").unwrap().id, 4, "heavy's newest");
        assert_eq!(
            q.over_share(0, "heavy"),
            None,
            "nobody holds more than heavy"
        );
        for i in 10..14 {
            q.push_back(tenant_entry(i, 0, t, "light"));
        }
        assert_eq!(q.over_share(0, "light"), None, "5 is not more than 4 + 1");
        assert_eq!(q.over_share(1, "light"), None, "another level");
    }

    #[test]
    fn higher_levels_still_come_first_and_ahead_counts_fair_turns() {
        let t = Instant::now();
        let mut q = PriorityQueue::default();
        for i in 0..5 {
            q.push_back(tenant_entry(i, 0, t, "heavy"));
        }
        q.push_back(tenant_entry(10, 3, t, "heavy"));
        q.push_back(tenant_entry(11, 0, t, "light"));
        assert_eq!(q.peek(t, None).unwrap().id, 10);
        // A new light request waits behind the higher level, its own one, and one of heavy's
        // for each of its own plus one: not behind all five.
        assert_eq!(q.ahead_of(0, "light"), 1 + 1 + 2);
        assert_eq!(q.ahead_of(0, "heavy"), 1 + 5 + 1);
    }
}
