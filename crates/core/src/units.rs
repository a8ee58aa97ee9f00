//! Durations and sizes as people write them on command lines and in configuration
//! (`500ms`, `2m`, `512MiB`), parsed and shown the same way everywhere.

use std::time::Duration;

/// Parses `500us`, `250ms`, `5s`, `2m`, `1h` or `0` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 5s or 2m"))?;
    let secs = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1000.0,
        "" if value == 0.0 => 0.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "" => return Err(format!("`{s}` needs a unit: ms, s, m or h")),
        other => {
            return Err(format!(
                "unknown duration unit `{other}`; use ms, s, m or h"
            ))
        }
    };
    if !(secs >= 0.0 && secs.is_finite()) {
        return Err(format!("`{s}` is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1024`, `512KiB`, `64MiB`, `8GiB`, `1.5GB` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512MiB or 8GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    if !(value >= 0.0 && value.is_finite()) {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok((value * mult as f64) as u64)
}

/// A duration flag: parsed by [`parse_duration`], shown as `500ms`, `30s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Dur)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 if self.0.is_zero() => write!(f, "0"),
            _ if !self.0.subsec_nanos().is_multiple_of(1_000_000) => {
                write!(f, "{}us", self.0.as_micros())
            }
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

/// A size flag: parsed by [`parse_bytes`], shown as `512MiB`, `4GiB` or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_bytes(s).map(Size)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if b != 0 && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5XB").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("1500us").unwrap(),
            Duration::from_micros(1500)
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn shown_defaults_parse_back_to_themselves() {
        for d in ["0", "250us", "500ms", "5s", "1m", "90s", "2h"] {
            let parsed: Dur = d.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<Dur>().unwrap(), parsed, "{d}");
        }
        assert_eq!(Dur(Duration::from_secs(60)).to_string(), "1m");
        assert_eq!(Dur(Duration::from_millis(500)).to_string(), "500ms");
        assert_eq!(Size(4 << 20).to_string(), "4MiB");
        assert_eq!(Size(1000).to_string(), "1000");
        assert_eq!("512MiB".parse::<Size>().unwrap(), Size(512 << 20));
    }
}
