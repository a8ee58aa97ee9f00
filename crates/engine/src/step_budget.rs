//! How many prefill tokens a step may carry beside running decodes. A step that prefills a
//! long chunk stalls every decode in it: each of those sequences waits the whole step for
//! its next token. So when decodes run, prefill chunks are sized to a step-time budget, from
//! what recent steps cost.
//!
//! * **The decode step** a relative budget multiplies is the one a typical token waits for:
//!   the mean time of recent steps of decodes alone, each weighted by its decodes. A step of
//!   one decode beside a prompt may then take as long as the budget allows a full batch's,
//!   which is what keeps inter-token latency within that multiple of its median.
//! * **What the decodes of this step cost** is fitted to the decode-only steps as
//!   `e0 + e1·decodes`; the prefill gets the rest of the budget.
//! * **A prefill token's price** grows with the context it attends to, so a chunk is priced
//!   `a·tokens + b·positions` (positions: the context positions its tokens attend, in
//!   thousands), `a` and `b` fitted by least squares to what prefill added to recent steps
//!   beside decodes.
//!
//! Older steps weigh less in every estimate. With no decode running nobody waits, and a step
//! takes the whole `max_batch_tokens`.
//!
//! Pure state: the engine reports each step's work and wall time; nothing here reads a clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use openinfer_core::units::{parse_duration, Dur};

/// The most a step that carries running decodes may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepTimeBudget {
    /// No limit: prefill chunks fill `max_batch_tokens` (written `off`).
    Off,
    /// This many times a step of the decodes alone (written `2x`); above 1.
    Relative(f64),
    /// A fixed time (written `80ms`).
    Absolute(Duration),
}

impl Default for StepTimeBudget {
    /// Twice a decode step: inter-token latency stays within about twice its median while
    /// prompts prefill beside the decodes.
    fn default() -> Self {
        StepTimeBudget::Relative(2.0)
    }
}

impl FromStr for StepTimeBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(StepTimeBudget::Off);
        }
        if let Some(ratio) = s.strip_suffix('x') {
            return match ratio.trim().parse::<f64>() {
                Ok(r) if r > 1.0 && r.is_finite() => Ok(StepTimeBudget::Relative(r)),
                _ => Err(format!(
                    "`{s}`: a relative budget is a multiple above 1 of a decode step, e.g. 2x"
                )),
            };
        }
        match parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(StepTimeBudget::Absolute(d)),
            Ok(_) => {
                Err("a step-time budget of 0 would stop prefill; use `off` for no budget".into())
            }
            Err(e) => Err(format!(
                "{e}; or a multiple of a decode step (2x), or `off`"
            )),
        }
    }
}

impl fmt::Display for StepTimeBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepTimeBudget::Off => write!(f, "off"),
            StepTimeBudget::Relative(r) => write!(f, "{r}x"),
            StepTimeBudget::Absolute(d) => write!(f, "{}", Dur(*d)),
        }
    }
}

/// Fewest prefill tokens a step with decodes carries, whatever the estimate: prompts always
/// make progress. Small: deep in a long prompt a token's attention alone can cost several
/// decode tokens.
const MIN_CHUNK: usize = 4;
/// How much each older step weighs in the estimates, against the one after it.
const FORGET: f64 = 0.95;

/// A chunk's size, as its price sees it: tokens, and context positions attended (thousands).
fn features(start: usize, len: usize) -> [f64; 2] {
    let (s, n) = (start as f64, len as f64);
    [n, n * (s + (n + 1.0) / 2.0) / 1000.0]
}

/// Decayed sums over the steps of decodes alone: their count, decodes (`d`), `d²`, seconds
/// (`t`) and `d·t`.
#[derive(Debug, Clone, Default)]
struct DecodeSteps {
    n: f64,
    d: f64,
    dd: f64,
    t: f64,
    dt: f64,
}

impl DecodeSteps {
    fn observe(&mut self, decodes: usize, secs: f64) {
        let d = decodes as f64;
        for (sum, x) in [
            (&mut self.n, 1.0),
            (&mut self.d, d),
            (&mut self.dd, d * d),
            (&mut self.t, secs),
            (&mut self.dt, d * secs),
        ] {
            *sum = FORGET * *sum + x;
        }
    }

    /// The step a typical token waits for: seconds weighted by decodes.
    fn per_token_step(&self) -> Option<f64> {
        (self.d > 0.0).then(|| self.dt / self.d)
    }

    /// Seconds of a step of `decodes` decodes alone: `e0 + e1·decodes` by least squares, both
    /// non-negative; the mean step while every step ran alike.
    fn secs(&self, decodes: usize) -> Option<f64> {
        if self.n <= 0.0 {
            return None;
        }
        let mean = self.t / self.n;
        let det = self.n * self.dd - self.d * self.d;
        if det <= 1e-9 * self.n * self.dd {
            return Some(mean);
        }
        let e1 = (self.n * self.dt - self.d * self.t) / det;
        let e0 = (self.t - e1 * self.d) / self.n;
        let d = decodes as f64;
        Some(match (e0 >= 0.0, e1 >= 0.0) {
            (true, true) => e0 + e1 * d,
            (_, false) => mean,
            (false, true) => d * self.dt / self.dd,
        })
    }
}

/// The running estimates and the budget (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct ChunkSizer {
    budget: StepTimeBudget,
    /// Steps of decodes alone.
    decode: DecodeSteps,
    /// Seconds a token, and a thousand positions, add to a step: fitted, or guessed from a
    /// step of prefill alone until steps beside decodes are seen.
    price: Option<[f64; 2]>,
    /// The fit's decayed sums: features × features, and features × seconds.
    xx: [[f64; 2]; 2],
    xy: [f64; 2],
}

impl ChunkSizer {
    /// No estimates yet.
    pub fn new(budget: StepTimeBudget) -> Self {
        ChunkSizer {
            budget,
            decode: DecodeSteps::default(),
            price: None,
            xx: [[0.0; 2]; 2],
            xy: [0.0; 2],
        }
    }

    /// Seconds of prefill a step may add beside `decodes` decodes; `None` for no limit.
    pub fn prefill_secs(&self, decodes: usize) -> Option<f64> {
        if decodes == 0 || self.price.is_none() {
            return None;
        }
        let own = self.decode.secs(decodes)?;
        match self.budget {
            StepTimeBudget::Off => None,
            StepTimeBudget::Relative(r) => Some((r * self.decode.per_token_step()? - own).max(0.0)),
            StepTimeBudget::Absolute(d) => Some((d.as_secs_f64() - own).max(0.0)),
        }
    }

    /// What `len` prefill tokens from position `start` add to a step, in seconds.
    pub fn cost(&self, start: usize, len: usize) -> f64 {
        let [a, b] = self.price.unwrap_or([0.0; 2]);
        let [n, p] = features(start, len);
        a * n + b * p
    }

    /// The most prefill tokens from position `start` that fit in `secs` (`None`: no limit),
    /// at least [`MIN_CHUNK`] and at most `max`.
    pub fn tokens_within(&self, secs: Option<f64>, start: usize, max: usize) -> usize {
        let (Some(secs), Some([a, b])) = (secs, self.price) else {
            return max;
        };
        // a·n + b·n·(start + (n+1)/2)/1000 ≤ secs, a quadratic in n.
        let quad = b / 2000.0;
        let lin = a + b * (start as f64 + 0.5) / 1000.0;
        let n = if quad > 0.0 {
            (-lin + (lin * lin + 4.0 * quad * secs).sqrt()) / (2.0 * quad)
        } else if lin > 0.0 {
            secs / lin
        } else {
            return max;
        };
        (n.floor().max(0.0) as usize).clamp(MIN_CHUNK.min(max), max)
    }

    /// Records a step: `decodes` decode tokens and prefill chunks (`(start, len)`) took
    /// `elapsed`.
    pub fn observe(&mut self, decodes: usize, chunks: &[(usize, usize)], elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if chunks.is_empty() {
            if decodes > 0 {
                self.decode.observe(decodes, secs);
            }
            return;
        }
        let mut x = [0.0; 2];
        for &(start, len) in chunks {
            let f = features(start, len);
            x[0] += f[0];
            x[1] += f[1];
        }
        // The price is fitted on steps that carry decodes too, the steps it is for: a step of
        // prefill alone runs many rows at once, at a lower cost per row. Such a step only
        // gives a first guess.
        let decode = match (decodes, self.decode.secs(decodes)) {
            (0, _) => {
                if self.price.is_none() {
                    self.price = Some([secs / x[0], 0.0]);
                }
                return;
            }
            (_, None) => return,
            (_, Some(d)) => d,
        };
        let y = (secs - decode).max(0.0);
        for i in 0..2 {
            for j in 0..2 {
                self.xx[i][j] = FORGET * self.xx[i][j] + x[i] * x[j];
            }
            self.xy[i] = FORGET * self.xy[i] + x[i] * y;
        }
        self.price = Some(self.fit());
    }

    /// Least squares of the decayed sums, both prices kept non-negative; a little ridge
    /// keeps it defined while every step attends alike.
    fn fit(&self) -> [f64; 2] {
        let ridge = 1e-6 * (self.xx[0][0] + self.xx[1][1]);
        let (p, q, r) = (self.xx[0][0] + ridge, self.xx[0][1], self.xx[1][1] + ridge);
        let det = p * r - q * q;
        let [u, v] = self.xy;
        let (a, b) = if det > 0.0 {
            ((r * u - q * v) / det, (p * v - q * u) / det)
        } else {
            (u / p.max(f64::MIN_POSITIVE), 0.0)
        };
        match (a >= 0.0, b >= 0.0) {
            (true, true) => [a, b],
            // One price alone, where the pair would make the other negative.
            (false, _) => [0.0, (v / r.max(f64::MIN_POSITIVE)).max(0.0)],
            (true, false) => [(u / p.max(f64::MIN_POSITIVE)).max(0.0), 0.0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefill tokens at context 0 a step with `decodes` decodes may carry.
    fn tokens(s: &ChunkSizer, decodes: usize, max: usize) -> usize {
        s.tokens_within(s.prefill_secs(decodes), 0, max)
    }

    #[test]
    fn budgets_parse_show_and_refuse_what_would_stop_prefill() {
        for (text, want) in [
            ("off", StepTimeBudget::Off),
            ("2x", StepTimeBudget::Relative(2.0)),
            ("1.5x", StepTimeBudget::Relative(1.5)),
            ("80ms", StepTimeBudget::Absolute(Duration::from_millis(80))),
        ] {
            let b: StepTimeBudget = text.parse().unwrap();
            assert_eq!(b, want);
            assert_eq!(b.to_string(), text);
        }
        for bad in ["1x", "0.5x", "x", "0", "0ms", "fast", "-2x"] {
            assert!(bad.parse::<StepTimeBudget>().is_err(), "{bad}");
        }
        assert_eq!(StepTimeBudget::default().to_string(), "2x");
    }

    /// Steps of 4 decodes beside a chunk at `start` cost `base + a·tokens + b·positions`:
    /// where the chunk settles, and what its step takes.
    fn settle(budget: StepTimeBudget, start: usize, base: f64, a: f64, b: f64) -> (usize, f64) {
        let mut s = ChunkSizer::new(budget);
        let time = |st: usize, n: usize| {
            let [t, p] = features(st, n);
            Duration::from_secs_f64(base + a * t + b * p)
        };
        // Before any estimate: everything goes.
        assert_eq!(tokens(&s, 4, 512), 512);
        s.observe(0, &[(0, 512)], time(0, 512));
        s.observe(4, &[], time(0, 0));
        // Chunks at varied depths, as prompts of several lengths give.
        for i in 0..60 {
            let at = if i % 2 == 0 { start } else { start / 4 };
            let chunk = s.tokens_within(s.prefill_secs(4), at, 512);
            s.observe(4, &[(at, chunk)], time(at, chunk));
            s.observe(4, &[], time(0, 0));
        }
        let chunk = s.tokens_within(s.prefill_secs(4), start, 512);
        (chunk, time(start, chunk).as_secs_f64())
    }

    #[test]
    fn a_relative_budget_keeps_mixed_steps_within_that_multiple_of_a_decode_step() {
        // 40 ms decode steps, 0.5 ms a token and nothing a position: 2x leaves 40 ms, 80
        // tokens.
        let (chunk, step) = settle(StepTimeBudget::Relative(2.0), 0, 0.040, 0.0005, 0.0);
        assert!((78..=80).contains(&chunk), "{chunk}");
        assert!(step <= 0.080 + 1e-6, "{step}");
        let (chunk, _) = settle(StepTimeBudget::Relative(3.0), 0, 0.040, 0.0005, 0.0);
        assert!((158..=160).contains(&chunk), "{chunk}");
    }

    #[test]
    fn a_token_deep_in_a_long_prompt_costs_more() {
        // 2 ms a thousand positions: at 3,000 a token costs 6.5 ms, and 40 ms hold 6.
        for budget in [StepTimeBudget::Relative(2.0), StepTimeBudget::Off] {
            let (chunk, step) = settle(budget, 3000, 0.040, 0.0005, 0.002);
            if budget == StepTimeBudget::Off {
                assert_eq!(chunk, 512);
            } else {
                assert!((5..=6).contains(&chunk), "{chunk}");
                assert!(step <= 0.080 + 1e-3, "{step}");
            }
        }
    }

    #[test]
    fn an_absolute_budget_a_floor_and_no_decodes() {
        let at = |ms: u64| StepTimeBudget::Absolute(Duration::from_millis(ms));
        let (chunk, step) = settle(at(50), 0, 0.040, 0.0005, 0.0);
        assert!((18..=20).contains(&chunk), "{chunk}");
        assert!(step <= 0.050 + 1e-6);
        // A budget below the decode step itself still prefills the floor.
        let (chunk, _) = settle(at(10), 0, 0.040, 0.0005, 0.0);
        assert_eq!(chunk, MIN_CHUNK);
        let mut s = ChunkSizer::new(StepTimeBudget::default());
        s.observe(4, &[], Duration::from_millis(40));
        s.observe(4, &[(0, 100)], Duration::from_millis(90));
        assert!(tokens(&s, 4, 512) < 512);
        assert_eq!(tokens(&s, 0, 512), 512, "no decode: no limit");
        assert_eq!(tokens(&s, 4, 8), 8, "never above the token budget");
    }

    #[test]
    fn a_step_of_few_decodes_may_take_what_a_full_batch_may() {
        // Decode steps cost 7 ms + 3 ms a decode; steps of one and of eight decodes alternate,
        // so a typical token waits about (10 + 8 · 31) / 9 ≈ 28.7 ms (recent steps weigh more).
        let mut s = ChunkSizer::new(StepTimeBudget::Relative(2.0));
        s.observe(0, &[(0, 100)], Duration::from_millis(100));
        for _ in 0..30 {
            s.observe(1, &[], Duration::from_millis(10));
            s.observe(8, &[], Duration::from_millis(31));
        }
        let typical = (0.010 + 8.0 * 0.031) / 9.0;
        for (decodes, own) in [(1, 0.010), (8, 0.031), (4, 0.019)] {
            let secs = s.prefill_secs(decodes).unwrap();
            assert!(
                (secs + own - 2.0 * typical).abs() < 1e-3,
                "{decodes} decodes: {own} s of decodes and {secs} s of prefill"
            );
        }
    }

    #[test]
    fn a_token_is_priced_by_the_steps_that_carry_decodes() {
        let mut s = ChunkSizer::new(StepTimeBudget::Relative(2.0));
        // A first guess from a step of prefill alone...
        s.observe(0, &[(0, 100)], Duration::from_millis(100));
        s.observe(4, &[], Duration::from_millis(40));
        assert_eq!(tokens(&s, 4, 512), 40);
        // ...that later steps of prefill alone (cheaper per row) do not move,
        for _ in 0..10 {
            s.observe(0, &[(0, 512)], Duration::from_millis(100));
        }
        assert_eq!(tokens(&s, 4, 512), 40);
        // while steps beside decodes do: 5 ms a token leaves room for 8.
        for _ in 0..40 {
            s.observe(4, &[(0, 10)], Duration::from_millis(90));
        }
        assert!((7..=8).contains(&tokens(&s, 4, 512)));
    }
}
