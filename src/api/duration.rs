//! Kubernetes-style durations (`5m`, `1h30m`, `90s`, `1.5h`): the Go `time.ParseDuration`
//! format that users know from cert-manager and every other controller.

use std::time::Duration;

/// Why a duration string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a Go-style duration such as `5m`, `1h30m` or `1.5s`. Negative durations are refused.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = input;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit"))?;
        if number_len == 0 {
            return Err(err("expected a number"));
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| err("bad number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err("unknown unit (use ns, us, ms, s, m or h)")),
        };
        rest = &rest[unit_len..];
        total_nanos += number * unit_nanos;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("5m", Duration::from_secs(300)),
            ("90s", Duration::from_secs(90)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("0", Duration::ZERO),
            ("2h0m0s", Duration::from_secs(7200)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_malformed_durations() {
        for input in ["", "5", "m", "-5m", "5 m", "5d", "1h30", "abc"] {
            assert!(parse_duration(input).is_err(), "{input} should be refused");
        }
    }
}
