//! Summary statistics of benchmark samples.

use serde::Serialize;

/// Mean and percentiles of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Summary {
    /// Summarises `values` (any order); all zero when empty.
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
        }
    }
}

/// The `q`-th percentile of sorted `v`, interpolating linearly between closest ranks (the
/// definition of numpy's default).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = (q / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// The median of `v` (the upper one of an even count), as the repeated benchmarks report.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_hand_computed_values() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // numpy.percentile(range(1, 11), [50, 90, 99]) = 5.5, 9.1, 9.91
        let s = Summary::of(&v);
        assert_eq!(s.n, 10);
        assert!((s.mean - 5.5).abs() < 1e-12);
        assert!((s.p50 - 5.5).abs() < 1e-12);
        assert!((s.p90 - 9.1).abs() < 1e-12);
        assert!((s.p99 - 9.91).abs() < 1e-12);
        assert_eq!(Summary::of(&[3.0]).p99, 3.0);
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}

/// Service-level objectives a request must meet to count towards goodput.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Time to first token, seconds.
    pub ttft: Option<f64>,
    /// Time per output token after the first, seconds.
    pub tpot: Option<f64>,
    /// End-to-end latency, seconds.
    pub e2e: Option<f64>,
}

impl Slo {
    /// Parses `ttft=200ms,tpot=50ms,e2e=5s`.
    pub fn parse(s: &str) -> Result<Slo, String> {
        let mut slo = Slo::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected NAME=DURATION, e.g. ttft=200ms"))?;
            let d = openinfer_core::units::parse_duration(v)?.as_secs_f64();
            match k.trim() {
                "ttft" => slo.ttft = Some(d),
                "tpot" => slo.tpot = Some(d),
                "e2e" => slo.e2e = Some(d),
                other => return Err(format!("unknown SLO `{other}`; use ttft, tpot or e2e")),
            }
        }
        Ok(slo)
    }

    /// True when a request with these latencies meets every objective.
    pub fn met(&self, ttft: f64, tpot: f64, e2e: f64) -> bool {
        self.ttft.is_none_or(|t| ttft <= t)
            && self.tpot.is_none_or(|t| tpot <= t)
            && self.e2e.is_none_or(|t| e2e <= t)
    }
}

#[cfg(test)]
mod slo_tests {
    use super::*;

    #[test]
    fn slos_parse_and_judge() {
        let slo = Slo::parse("ttft=200ms, tpot=50ms").unwrap();
        assert_eq!(slo.ttft, Some(0.2));
        assert_eq!(slo.tpot, Some(0.05));
        assert_eq!(slo.e2e, None);
        assert!(slo.met(0.2, 0.05, 100.0));
        assert!(!slo.met(0.21, 0.01, 1.0));
        assert!(!slo.met(0.1, 0.06, 1.0));
        assert!(Slo::default().met(9.0, 9.0, 9.0));
        assert!(Slo::parse("latency=1s").is_err());
        assert!(Slo::parse("ttft").is_err());
    }
}
