//! Load shapes for `openinfer bench`: prompts (synthetic or from a dataset file), request
//! arrival times and the priority of each request.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// One prompt of a dataset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Prompt {
    /// The text sent as `prompt`.
    pub prompt: String,
    /// Tokens to generate (default: `--output-len`).
    #[serde(default)]
    pub output_len: Option<u32>,
    /// Priority (default: from `--priority-mix`).
    #[serde(default)]
    pub priority: Option<i32>,
}

#[derive(Deserialize)]
struct ShareGptEntry {
    #[serde(default)]
    conversations: Vec<ShareGptTurn>,
}

/// The prompts of a dataset file and what reading it left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The prompts, in file order.
    pub prompts: Vec<Prompt>,
    /// Records read whole.
    pub records: usize,
    /// Records read whole but without a non-empty human turn and a reply (not usable).
    pub skipped: usize,
    /// Records cut off by the end of the file (ShareGPT V3's JSON as published ends
    /// mid-record): dropped.
    pub truncated: usize,
}

impl Dataset {
    /// One line saying what was read and what was left out.
    pub fn describe(&self) -> String {
        format!(
            "{} prompts from {} records ({} without a human turn and a reply skipped, {} cut off at the end of the file dropped)",
            self.prompts.len(),
            self.records,
            self.skipped,
            self.truncated
        )
    }
}

#[derive(Deserialize)]
struct ShareGptTurn {
    from: String,
    value: String,
}

/// Reads a dataset: JSON Lines of `{"prompt": ..., "output_len": ..., "priority": ...}`
/// (`.jsonl`), or a ShareGPT JSON array, whose first human turn is the prompt and whose first
/// reply's word count (a stand-in for its token count) is the output length. A ShareGPT array
/// cut off mid-record keeps its complete records and counts the one it drops.
pub fn read_dataset(path: &Path) -> Result<Dataset, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let dataset = if path.extension().is_some_and(|e| e == "jsonl") {
        parse_jsonl(&text).map(|prompts| Dataset {
            records: prompts.len(),
            prompts,
            ..Dataset::default()
        })
    } else {
        parse_sharegpt(&text)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if dataset.prompts.is_empty() {
        return Err(format!("{}: no prompts in the file", path.display()));
    }
    Ok(dataset)
}

fn parse_jsonl(text: &str) -> Result<Vec<Prompt>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let p: Prompt = serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
            if p.prompt.is_empty() || p.output_len == Some(0) {
                return Err(format!(
                    "line {}: `prompt` must be non-empty and `output_len` at least 1",
                    i + 1
                ));
            }
            Ok(p)
        })
        .collect()
}

fn parse_sharegpt(text: &str) -> Result<Dataset, String> {
    let mut rest = text
        .trim_start()
        .strip_prefix('[')
        .ok_or("not JSON Lines (.jsonl) nor a ShareGPT array (it does not start with `[`)")?;
    let mut out = Dataset::default();
    loop {
        rest = rest.trim_start();
        if rest.starts_with(']') || rest.is_empty() {
            // `]` ends the array; nothing left means the file ended between records.
            break;
        }
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<ShareGptEntry>();
        match stream.next() {
            Some(Ok(entry)) => {
                out.records += 1;
                rest = rest[stream.byte_offset()..].trim_start();
                rest = rest.strip_prefix(',').unwrap_or(rest);
                match sharegpt_prompt(entry) {
                    Some(p) => out.prompts.push(p),
                    None => out.skipped += 1,
                }
            }
            Some(Err(e)) if e.is_eof() => {
                out.truncated += 1;
                break;
            }
            Some(Err(e)) => return Err(format!("record {}: {e}", out.records + 1)),
            None => break,
        }
    }
    Ok(out)
}

/// The first human turn and the word count of the reply after it.
fn sharegpt_prompt(e: ShareGptEntry) -> Option<Prompt> {
    let mut turns = e.conversations.into_iter();
    let ask = turns.find(|t| t.from == "human" || t.from == "user")?;
    let reply = turns.next()?;
    let words = reply.value.split_whitespace().count() as u32;
    (!ask.value.is_empty() && words > 0).then_some(Prompt {
        prompt: ask.value,
        output_len: Some(words),
        priority: None,
    })
}

/// Parses `0:80,5:20` (priority:weight, ...) into (priority, cumulative share) pairs.
pub fn parse_priority_mix(s: &str) -> Result<Vec<(i32, f64)>, String> {
    let mut parts = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (p, w) = item
            .split_once(':')
            .ok_or_else(|| format!("`{item}`: expected PRIORITY:WEIGHT, e.g. 0:80,5:20"))?;
        let p: i32 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` is not a priority"))?;
        let w: f64 = w
            .trim()
            .parse()
            .map_err(|_| format!("`{w}` is not a weight"))?;
        if !(w > 0.0 && w.is_finite()) {
            return Err(format!("`{item}`: the weight must be positive"));
        }
        parts.push((p, w));
    }
    if parts.is_empty() {
        return Err("the priority mix is empty; e.g. 0:80,5:20".into());
    }
    let total: f64 = parts.iter().map(|(_, w)| w).sum();
    let mut acc = 0.0;
    Ok(parts
        .into_iter()
        .map(|(p, w)| {
            acc += w / total;
            (p, acc)
        })
        .collect())
}

/// The priority of request `i` of `n`, spread evenly so that every prefix of the run has the
/// mix's proportions (no randomness: runs are comparable).
pub fn priority_of(mix: &[(i32, f64)], i: usize) -> i32 {
    // Low-discrepancy position of request i in [0, 1).
    let x = ((i as f64 + 0.5) * 0.618_033_988_749_895).fract();
    mix.iter()
        .find(|(_, cum)| x < *cum)
        .or(mix.last())
        .map_or(0, |(p, _)| *p)
}

/// Gaps between arrivals at `rate` requests per second: gamma-distributed with shape
/// `burstiness` (1 = Poisson; below 1 burstier, above 1 smoother) and mean `1 / rate`.
pub fn interarrival<R: Rng>(rng: &mut R, rate: f64, burstiness: f64) -> Duration {
    let scale = 1.0 / (rate * burstiness);
    Duration::from_secs_f64(gamma(rng, burstiness) * scale)
}

/// A Gamma(shape, 1) sample (Marsaglia and Tsang; shape < 1 by boosting).
fn gamma<R: Rng>(rng: &mut R, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal sample (Box–Muller).
fn normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn datasets_parse_in_both_formats() {
        let jsonl =
            "{\"prompt\": \"Hi\", \"output_len\": 5, \"priority\": 3}\n\n{\"prompt\": \"Yo\"}\n";
        let p = parse_jsonl(jsonl).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].output_len, p[0].priority), (Some(5), Some(3)));
        assert_eq!((p[1].output_len, p[1].priority), (None, None));
        assert!(parse_jsonl("{\"prompt\": \"\"}").is_err());
        assert!(parse_jsonl("not json").unwrap_err().starts_with("line 1"));

        let sharegpt = r#"[
            {"conversations": [{"from": "human", "value": "Tell me"},
                               {"from": "gpt", "value": "one two three"}]},
            {"conversations": [{"from": "human", "value": "no reply"}]}
        ]"#;
        let d = parse_sharegpt(sharegpt).unwrap();
        assert_eq!((d.records, d.skipped, d.truncated), (2, 1, 0));
        let p = &d.prompts;
        assert_eq!(p.len(), 1, "entries without a reply are skipped");
        assert_eq!(
            (p[0].prompt.as_str(), p[0].output_len),
            ("Tell me", Some(3))
        );
    }

    #[test]
    fn a_sharegpt_file_cut_off_mid_record_keeps_its_complete_records() {
        let whole = r#"[{"id": "a", "conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "x y"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "two"}, {"from": "gpt", "value": "z"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "three"}, {"from": "gpt", "value": "w v u"}]}]"#;
        let all = parse_sharegpt(whole).unwrap();
        assert_eq!((all.prompts.len(), all.truncated), (3, 0));
        // Cut anywhere inside the third record: two prompts, one record dropped.
        let third = whole.find(r#"{"id": "c""#).unwrap();
        for cut in third + 1..whole.len() - 2 {
            let d = parse_sharegpt(&whole[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(d.prompts, all.prompts[..2], "cut at {cut}");
            assert_eq!((d.records, d.truncated), (2, 1), "cut at {cut}");
        }
        // Cut between records: nothing dropped.
        let d = parse_sharegpt(&whole[..third]).unwrap();
        assert_eq!((d.records, d.truncated), (2, 0));
        assert!(d.describe().contains("1 cut off") || d.truncated == 0);
        // A malformed record is an error naming it, not a silent cut.
        let bad = r#"[{"conversations": []}, {"conversations": 7}]"#;
        assert!(parse_sharegpt(bad).unwrap_err().starts_with("record 2"));
    }

    #[test]
    fn priority_mix_parses_and_spreads_in_proportion() {
        let mix = parse_priority_mix("0:80, 5:20").unwrap();
        assert_eq!(mix.len(), 2);
        assert!((mix[0].1 - 0.8).abs() < 1e-12 && (mix[1].1 - 1.0).abs() < 1e-12);
        let high = (0..1000).filter(|&i| priority_of(&mix, i) == 5).count();
        assert!((190..=210).contains(&high), "{high}");
        assert!(parse_priority_mix("0").is_err());
        assert!(parse_priority_mix("0:-1").is_err());
        assert!(parse_priority_mix("").is_err());
    }

    #[test]
    fn arrivals_have_the_asked_mean_and_burstiness() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for burstiness in [0.5, 1.0, 4.0] {
            let gaps: Vec<f64> = (0..20_000)
                .map(|_| interarrival(&mut rng, 50.0, burstiness).as_secs_f64())
                .collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            // Gamma(k, θ): mean kθ = 1/rate, coefficient of variation 1/√k.
            assert!(
                (mean - 0.02).abs() < 0.02 * 0.05,
                "mean {mean} at burstiness {burstiness}"
            );
            let cv = var.sqrt() / mean;
            let want = 1.0 / burstiness.sqrt();
            assert!((cv - want).abs() < want * 0.08, "cv {cv}, want {want}");
        }
    }
}
