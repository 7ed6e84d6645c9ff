//! The duration strings the API accepts (`refreshInterval: 30s`), parsed the
//! same way by the controller and the sidecar.

use std::time::Duration;

use crate::{Error, Result};

/// The smallest refresh interval: anything faster only loads Vault.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The largest refresh interval, so a deleted secret stops working within a day.
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Parses a Go-style duration made of `<number><unit>` parts, units `ms`, `s`,
/// `m`, `h` (e.g. `30s`, `1m30s`, `1.5h`). Matches the CRD's
/// `duration()`-checked strings for these units.
pub fn parse(input: &str) -> Result<Duration> {
    let err = |reason: &str| Error::Parse {
        what: format!("duration {input:?}"),
        reason: reason.to_string(),
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let mut rest = input;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err("expected a number"));
        }
        let number = &rest[..num_len];
        // Digits with an optional fraction, as the CRD pattern has it: no
        // "1." or ".5".
        let well_formed = match number.split_once('.') {
            Some((int, frac)) => !int.is_empty() && !frac.is_empty() && !frac.contains('.'),
            None => true,
        };
        if !well_formed {
            return Err(err("bad number"));
        }
        let value: f64 = number.parse().map_err(|_| err("bad number"))?;
        rest = &rest[num_len..];
        let (unit_secs, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(err("expected a unit: ms, s, m or h"));
        };
        rest = &rest[unit_len..];
        total += value * unit_secs;
    }
    if !total.is_finite() || total > MAX_REFRESH_INTERVAL.as_secs_f64() * 365.0 {
        return Err(err("too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for bad in [
            "", "30", "s", "30x", "-5s", "1e9s", "30 s", "1.s", ".5s", "1.2.3s",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("duration"), "{bad:?} -> {e}");
        }
    }
}
