//! Per-tenant quotas: requests and tokens in any minute, and requests in flight.
//!
//! Each minute quota is a sliding window of sixty one-second slots. Tokens are reserved at
//! admission for the whole request (prompt + `max_new_tokens`) and what was not generated is
//! handed back when it ends, so a tenant never overshoots its quota even while its requests
//! run. A refused request learns when the window will have room for it (the oldest slots
//! leaving it), which becomes its `grpc-retry-pushback-ms`.
//!
//! [`Quotas`] is plain state (tested with made-up instants); [`Reservation`] is what one
//! request holds, and hands its share back when dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openinfer_core::{Code, ErrorCode};

use super::Tenant;
use crate::request::Output;

/// The window every minute quota slides over.
const WINDOW_SECS: u64 = 60;

/// A quota a request would break.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuotaError {
    /// `requests_per_minute`.
    #[error("tenant `{tenant}` reached its requests_per_minute of {limit}")]
    Requests {
        /// The tenant.
        tenant: Arc<str>,
        /// Its quota.
        limit: u64,
        /// When the window has room again.
        retry: Duration,
    },
    /// `tokens_per_minute`.
    #[error("tenant `{tenant}` has {left} of its tokens_per_minute of {limit} left and this request reserves {need} (prompt + max_new_tokens)")]
    Tokens {
        /// The tenant.
        tenant: Arc<str>,
        /// Its quota.
        limit: u64,
        /// What is left in the window now.
        left: u64,
        /// What the request reserves.
        need: u64,
        /// When the window has room for it.
        retry: Duration,
    },
    /// A request larger than the whole quota: it can never be admitted as it is.
    #[error("this request reserves {need} tokens (prompt + max_new_tokens), more than the tokens_per_minute of {limit} of tenant `{tenant}`; lower max_new_tokens or shorten the prompt")]
    TooLarge {
        /// The tenant.
        tenant: Arc<str>,
        /// Its quota.
        limit: u64,
        /// What the request reserves.
        need: u64,
    },
    /// `max_concurrent`.
    #[error("tenant `{tenant}` has {limit} requests in flight, its max_concurrent")]
    Concurrent {
        /// The tenant.
        tenant: Arc<str>,
        /// Its quota.
        limit: u64,
    },
}

impl ErrorCode for QuotaError {
    fn code(&self) -> Code {
        match self {
            QuotaError::TooLarge { .. } => Code::InvalidArgument,
            _ => Code::ResourceExhausted,
        }
    }
}

impl QuotaError {
    /// When to retry (`None`: when a request of the tenant ends, not knowable here).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            QuotaError::Requests { retry, .. } | QuotaError::Tokens { retry, .. } => Some(*retry),
            _ => None,
        }
    }

    /// The refusal reason label.
    pub fn refusal(&self) -> crate::metrics::Refusal {
        use crate::metrics::Refusal;
        match self {
            QuotaError::Requests { .. } => Refusal::TenantRequests,
            QuotaError::Tokens { .. } | QuotaError::TooLarge { .. } => Refusal::TenantTokens,
            QuotaError::Concurrent { .. } => Refusal::TenantConcurrency,
        }
    }
}

/// Amounts taken in the last minute, by the second they were taken in.
#[derive(Debug, Default)]
struct Window {
    slots: VecDeque<(u64, u64)>,
    used: u64,
}

impl Window {
    fn expire(&mut self, sec: u64) {
        while let Some(&(s, amount)) = self.slots.front() {
            if s + WINDOW_SECS > sec {
                break;
            }
            self.used -= amount;
            self.slots.pop_front();
        }
    }

    /// `None` when `need` fits under `limit` now; else the second from which it fits.
    fn fits_from(&self, need: u64, limit: u64) -> Option<u64> {
        if self.used + need <= limit {
            return None;
        }
        let mut used = self.used;
        for &(s, amount) in &self.slots {
            used -= amount;
            if used + need <= limit {
                return Some(s + WINDOW_SECS);
            }
        }
        // Unreachable for need <= limit: once every slot has left, it fits.
        Some(self.slots.back().map_or(0, |&(s, _)| s) + WINDOW_SECS)
    }

    fn add(&mut self, sec: u64, amount: u64) {
        match self.slots.back_mut() {
            Some((s, a)) if *s == sec => *a += amount,
            _ => self.slots.push_back((sec, amount)),
        }
        self.used += amount;
    }

    /// Hands back up to `amount` taken in second `sec` (nothing once it left the window).
    fn refund(&mut self, sec: u64, amount: u64) {
        if let Some((_, a)) = self.slots.iter_mut().find(|(s, _)| *s == sec) {
            let back = amount.min(*a);
            *a -= back;
            self.used -= back;
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    requests: Window,
    tokens: Window,
    in_flight: u64,
}

/// Every tenant's use of its quotas. Holds one entry per tenant with a quota (the tenants
/// file bounds them); a reload drops the entries of tenants no longer listed.
#[derive(Debug)]
pub struct Quotas {
    origin: Instant,
    usage: HashMap<Arc<str>, Usage>,
}

/// True when the tenant has any quota to keep.
fn limited(t: &Tenant) -> bool {
    t.requests_per_minute.is_some() || t.tokens_per_minute.is_some() || t.max_concurrent.is_some()
}

impl Quotas {
    /// No use yet; windows count seconds from `origin`.
    pub fn new(origin: Instant) -> Self {
        Quotas {
            origin,
            usage: HashMap::new(),
        }
    }

    fn sec(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn retry(&self, now: Instant, from_sec: u64) -> Duration {
        (self.origin + Duration::from_secs(from_sec)).saturating_duration_since(now)
    }

    /// Lets a new request of `tenant` in, if its concurrency and requests quota allow and
    /// its token window has room for at least `min_tokens`: the checks that come before any
    /// work is spent on the request. Counts it as a request, and as in flight until
    /// [`release`](Self::release).
    pub fn admit(
        &mut self,
        now: Instant,
        tenant: &Tenant,
        min_tokens: u64,
    ) -> Result<(), QuotaError> {
        if !limited(tenant) {
            return Ok(());
        }
        let sec = self.sec(now);
        let u = self.usage.entry(tenant.name.clone()).or_default();
        u.requests.expire(sec);
        u.tokens.expire(sec);
        if let Some(limit) = tenant.max_concurrent {
            if u.in_flight >= limit {
                return Err(QuotaError::Concurrent {
                    tenant: tenant.name.clone(),
                    limit,
                });
            }
        }
        if let Some(limit) = tenant.requests_per_minute {
            if let Some(from) = u.requests.fits_from(1, limit) {
                return Err(QuotaError::Requests {
                    tenant: tenant.name.clone(),
                    limit,
                    retry: self.retry(now, from),
                });
            }
        }
        if let Some(limit) = tenant.tokens_per_minute {
            if min_tokens > limit {
                return Err(QuotaError::TooLarge {
                    tenant: tenant.name.clone(),
                    limit,
                    need: min_tokens,
                });
            }
            if let Some(from) = u.tokens.fits_from(min_tokens, limit) {
                return Err(QuotaError::Tokens {
                    tenant: tenant.name.clone(),
                    limit,
                    left: limit.saturating_sub(u.tokens.used),
                    need: min_tokens,
                    retry: self.retry(now, from),
                });
            }
        }
        let u = self.usage.entry(tenant.name.clone()).or_default();
        u.requests.add(sec, 1);
        u.in_flight += 1;
        Ok(())
    }

    /// Reserves `tokens` of `tenant`'s token quota; returns the second they count in (for
    /// [`refund`](Self::refund)).
    pub fn reserve(
        &mut self,
        now: Instant,
        tenant: &Tenant,
        tokens: u64,
    ) -> Result<u64, QuotaError> {
        let sec = self.sec(now);
        let Some(limit) = tenant.tokens_per_minute else {
            return Ok(sec);
        };
        if tokens > limit {
            return Err(QuotaError::TooLarge {
                tenant: tenant.name.clone(),
                limit,
                need: tokens,
            });
        }
        let u = self.usage.entry(tenant.name.clone()).or_default();
        u.tokens.expire(sec);
        if let Some(from) = u.tokens.fits_from(tokens, limit) {
            let left = limit.saturating_sub(u.tokens.used);
            return Err(QuotaError::Tokens {
                tenant: tenant.name.clone(),
                limit,
                left,
                need: tokens,
                retry: self.retry(now, from),
            });
        }
        u.tokens.add(sec, tokens);
        Ok(sec)
    }

    /// Hands back `tokens` reserved in second `sec` and not used.
    pub fn refund(&mut self, tenant: &str, sec: u64, tokens: u64) {
        if let Some(u) = self.usage.get_mut(tenant) {
            u.tokens.refund(sec, tokens);
        }
    }

    /// A request admitted by [`admit`](Self::admit) ended.
    pub fn release(&mut self, tenant: &str) {
        if let Some(u) = self.usage.get_mut(tenant) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }

    /// Tokens of `tenant`'s quota in use in the window ending at `now`.
    pub fn tokens_used(&mut self, now: Instant, tenant: &str) -> u64 {
        let sec = self.sec(now);
        self.usage.get_mut(tenant).map_or(0, |u| {
            u.tokens.expire(sec);
            u.tokens.used
        })
    }

    /// Forgets tenants no longer listed (a reload), once nothing of theirs is in flight.
    pub fn retain(&mut self, listed: impl Fn(&str) -> bool) {
        self.usage.retain(|name, u| listed(name) || u.in_flight > 0);
    }
}

/// One request's hold on its tenant's quotas: in flight until dropped, and its token
/// reservation, of which what it did not generate is handed back when dropped.
pub struct Reservation {
    quotas: Arc<Mutex<Quotas>>,
    tenant: Arc<Tenant>,
    /// `(second, prompt tokens, max_new_tokens)` reserved.
    tokens: Option<(u64, u64, u64)>,
    /// The request's output once it is queued: how much it generated.
    output: Option<Arc<Output>>,
}

fn lock(q: &Mutex<Quotas>) -> std::sync::MutexGuard<'_, Quotas> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reservation {
    /// Admits a request of `tenant` (see [`Quotas::admit`]).
    pub fn admit(
        quotas: &Arc<Mutex<Quotas>>,
        tenant: Arc<Tenant>,
        min_tokens: u64,
    ) -> Result<Reservation, QuotaError> {
        if limited(&tenant) {
            lock(quotas).admit(Instant::now(), &tenant, min_tokens)?;
        }
        Ok(Reservation {
            quotas: quotas.clone(),
            tenant,
            tokens: None,
            output: None,
        })
    }

    /// Reserves the request's prompt and `max_new` tokens.
    pub fn reserve(&mut self, prompt: u64, max_new: u64) -> Result<(), QuotaError> {
        if self.tenant.tokens_per_minute.is_none() {
            return Ok(());
        }
        let sec = lock(&self.quotas).reserve(Instant::now(), &self.tenant, prompt + max_new)?;
        self.tokens = Some((sec, prompt, max_new));
        Ok(())
    }

    /// The request was queued; its output says how much it generates.
    pub fn track(&mut self, output: Arc<Output>) {
        self.output = Some(output);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !limited(&self.tenant) {
            return;
        }
        let mut q = lock(&self.quotas);
        q.release(&self.tenant.name);
        if let Some((sec, prompt, max_new)) = self.tokens {
            // Never queued: nothing was used. Otherwise the prompt and what was generated.
            let unused = match &self.output {
                None => prompt + max_new,
                Some(o) => max_new.saturating_sub(o.generated()),
            };
            q.refund(&self.tenant.name, sec, unused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> Tenant {
        Tenant {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent: conc,
            name: "t".into(),
            ..Tenant::anonymous()
        }
    }

    #[test]
    fn requests_per_minute_slides_and_says_when() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = Quotas::new(t0);
        let t = tenant(Some(2), None, None);
        q.admit(at(0), &t, 0).unwrap();
        q.admit(at(10_500), &t, 0).unwrap();
        let Err(QuotaError::Requests { retry, .. }) = q.admit(at(30_000), &t, 0) else {
            panic!("third request in a minute admitted")
        };
        assert_eq!(
            retry,
            Duration::from_secs(30),
            "the first leaves the window at 60 s"
        );
        q.admit(at(60_000), &t, 0).unwrap();
        assert!(
            q.admit(at(60_100), &t, 0).is_err(),
            "the second is still in the window"
        );
        q.admit(at(70_000), &t, 0).unwrap();
    }

    #[test]
    fn tokens_are_reserved_then_what_was_not_generated_comes_back() {
        let t0 = Instant::now();
        let mut q = Quotas::new(t0);
        let t = tenant(None, Some(1000), None);
        let s = q.reserve(t0, &t, 600).unwrap();
        let refused = q.reserve(t0, &t, 500).unwrap_err();
        assert!(
            matches!(
                refused,
                QuotaError::Tokens {
                    left: 400,
                    need: 500,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(60)));
        q.refund("t", s, 200); // generated 200 fewer than reserved
        assert_eq!(q.tokens_used(t0, "t"), 400);
        q.reserve(t0 + Duration::from_secs(1), &t, 500).unwrap();
        assert!(matches!(
            q.reserve(t0, &t, 1001),
            Err(QuotaError::TooLarge { .. })
        ));
        assert_eq!(q.tokens_used(t0 + Duration::from_secs(60), "t"), 500);
        assert_eq!(q.tokens_used(t0 + Duration::from_secs(61), "t"), 0);
    }

    #[test]
    fn concurrency_counts_until_release() {
        let t0 = Instant::now();
        let mut q = Quotas::new(t0);
        let t = tenant(None, None, Some(1));
        q.admit(t0, &t, 0).unwrap();
        assert!(matches!(
            q.admit(t0, &t, 0),
            Err(QuotaError::Concurrent { limit: 1, .. })
        ));
        q.release("t");
        q.admit(t0, &t, 0).unwrap();
    }

    #[test]
    fn a_tenant_without_quotas_keeps_no_state() {
        let t0 = Instant::now();
        let mut q = Quotas::new(t0);
        for _ in 0..1000 {
            q.admit(t0, &Tenant::anonymous(), 1 << 40).unwrap();
        }
        assert!(q.usage.is_empty());
    }

    #[test]
    fn never_overshoots_under_random_traffic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let mut q = Quotas::new(t0);
        let t = tenant(Some(50), Some(5000), Some(8));
        // (reserved second, reserved, used) of every admitted request.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut live: Vec<(u64, u64, u64)> = Vec::new();
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_millis(step * 37);
            if rng.random_bool(0.5) && !live.is_empty() {
                let (sec, reserved, used) = live.swap_remove(rng.random_range(0..live.len()));
                q.refund("t", sec, reserved - used);
                q.release("t");
                taken.push((sec, used));
                continue;
            }
            let need = rng.random_range(1..600);
            if q.admit(now, &t, need).is_ok() {
                match q.reserve(now, &t, need) {
                    Ok(sec) => live.push((sec, need, rng.random_range(0..=need))),
                    Err(_) => q.release("t"),
                }
            }
            let sec = now.duration_since(t0).as_secs();
            let in_window: u64 = taken
                .iter()
                .copied()
                .chain(live.iter().map(|&(s, r, _)| (s, r)))
                .filter(|(s, _)| s + WINDOW_SECS > sec)
                .map(|(_, u)| u)
                .sum();
            assert!(
                in_window <= 5000,
                "{in_window} tokens in the minute to {sec}"
            );
        }
    }
}
