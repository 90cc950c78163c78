//! Hour windows in UTC: `"09:00-17:00"`, wrapping `"22:00-06:00"`, all-day `"00:00-24:00"`.

use std::fmt;

use crate::PolicyError;

/// Minutes in a day.
pub(crate) const DAY_MINUTES: u16 = 24 * 60;

/// A daily window of UTC time, start inclusive, end exclusive, at minute
/// resolution. A window whose end is before its start wraps midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourWindow {
    start: u16,
    end: u16,
}

impl HourWindow {
    /// Parses `HH:MM-HH:MM`. Hours 00–23 (the end may be `24:00`), minutes
    /// 00–59, exactly two digits each. Start equal to end is refused as empty.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let bad = |reason| PolicyError::HourWindow {
            window: text.to_owned(),
            reason,
        };
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| bad("no '-' between start and end"))?;
        let start = parse_hhmm(a, false).map_err(bad)?;
        let end = parse_hhmm(b, true).map_err(bad)?;
        if start == end {
            return Err(bad(
                "start equals end, so the window is empty (use \"00:00-24:00\" for all day)",
            ));
        }
        Ok(HourWindow { start, end })
    }

    /// Whether `minute` (0–1439 since midnight UTC) lies in the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            self.start <= minute && minute < self.end
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Start, minutes since midnight.
    pub fn start_minute(&self) -> u16 {
        self.start
    }

    /// End (exclusive), minutes since midnight; 1440 for `24:00`.
    pub fn end_minute(&self) -> u16 {
        self.end
    }
}

impl fmt::Display for HourWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

fn parse_hhmm(s: &str, is_end: bool) -> Result<u16, &'static str> {
    let b = s.as_bytes();
    if b.len() != 5
        || b[2] != b':'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.is_ascii_digit())
    {
        return Err("times must be written HH:MM with two digits each");
    }
    let hh = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
    let mm = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
    if mm > 59 {
        return Err("minutes must be 00-59");
    }
    match (hh, mm) {
        (24, 0) if is_end => Ok(DAY_MINUTES),
        (24, 0) => Err("24:00 may only end a window"),
        (0..=23, _) => Ok(hh * 60 + mm),
        _ => Err("hours must be 00-23 (or 24:00 as an end)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> HourWindow {
        HourWindow::parse(s).unwrap()
    }

    #[test]
    fn start_inclusive_end_exclusive() {
        let day = w("09:00-17:00");
        assert!(!day.contains(8 * 60 + 59));
        assert!(day.contains(9 * 60));
        assert!(day.contains(16 * 60 + 59));
        assert!(!day.contains(17 * 60));
    }

    #[test]
    fn wraps_midnight() {
        let night = w("22:00-06:00");
        assert!(night.contains(22 * 60));
        assert!(night.contains(23 * 60 + 59));
        assert!(night.contains(0));
        assert!(night.contains(5 * 60 + 59));
        assert!(!night.contains(6 * 60));
        assert!(!night.contains(21 * 60 + 59));
        assert!(!night.contains(12 * 60));
    }

    #[test]
    fn all_day() {
        let all = w("00:00-24:00");
        assert!((0..DAY_MINUTES).all(|m| all.contains(m)));
        assert_eq!(all.to_string(), "00:00-24:00");
    }

    #[test]
    fn malformed_windows_are_refused() {
        for bad in [
            "25:00-26:00",
            "9-17",
            "09:00-09:00",
            "09:00",
            "09:00-17",
            "9:00-17:00",
            "09:60-10:00",
            "24:00-06:00",
            "09:00-24:01",
            "",
            "-",
            "ab:cd-ef:gh",
            "09:00-17:00-18:00",
            " 09:00-17:00",
            "09:00–17:00",
            "０9:00-17:00",
        ] {
            assert!(
                matches!(HourWindow::parse(bad), Err(PolicyError::HourWindow { .. })),
                "{bad:?} should be refused"
            );
        }
    }
}
