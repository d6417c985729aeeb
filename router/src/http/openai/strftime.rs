//! A small `strftime` for the `strftime_now(format)` helper of Hugging Face chat templates
//! (Llama 3.1 writes `strftime_now("%d %b %Y")`), so no date-time crate is needed.
//!
//! Times are UTC (transformers uses the server's local time, which is UTC in containers).
//! Directives: `%a %A %b %B %d %e %H %I %j %m %M %p %S %y %Y %Z %z %F %T %%`, and glibc's
//! `%-d`-style flag that drops the zero padding of numeric fields. Anything else is copied as is.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC date and time broken into fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday
    weekday: usize,
    /// 1..=366
    yearday: u32,
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let leap = u32::from(month > 2 && is_leap(year));
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday (3).
            weekday: (days + 3).rem_euclid(7) as usize,
            yearday: CUMULATIVE[month as usize - 1] + day + leap,
        }
    }
}

/// `format` applied to `secs` seconds since the Unix epoch, in UTC.
pub(super) fn strftime(format: &str, secs: i64) -> String {
    let t = DateTime::from_unix(secs);
    let mut out = String::with_capacity(format.len() * 2);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let pad = chars.next_if_eq(&'-').is_none();
        let num = |v: i64, width: usize| {
            if pad {
                format!("{v:0width$}")
            } else {
                v.to_string()
            }
        };
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let hour12 = (t.hour + 11) % 12 + 1;
        let piece = match d {
            'a' => DAYS[t.weekday][..3].to_string(),
            'A' => DAYS[t.weekday].to_string(),
            'b' | 'h' => MONTHS[t.month as usize - 1][..3].to_string(),
            'B' => MONTHS[t.month as usize - 1].to_string(),
            'd' => num(t.day.into(), 2),
            'e' => format!("{:>2}", t.day),
            'H' => num(t.hour.into(), 2),
            'I' => num(hour12.into(), 2),
            'j' => num(t.yearday.into(), 3),
            'm' => num(t.month.into(), 2),
            'M' => num(t.minute.into(), 2),
            'p' => if t.hour < 12 { "AM" } else { "PM" }.to_string(),
            'S' => num(t.second.into(), 2),
            'y' => num(t.year.rem_euclid(100), 2),
            'Y' => t.year.to_string(),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            'F' => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if pad { "" } else { "-" }),
        };
        out.push_str(&piece);
    }
    out
}

/// `format` applied to the current time (UTC).
pub(super) fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    strftime(format, secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        // datetime.datetime(2024, 7, 23, 15, 4, 5, tzinfo=utc).timestamp() == 1721747045
        let t = 1_721_747_045;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(strftime("%A, %B %-d, %y", t), "Tuesday, July 23, 24");
        assert_eq!(strftime("%H:%M:%S %I%p %j", t), "15:04:05 03PM 205");
        assert_eq!(
            strftime("%F %T %Z%z 100%% %q", t),
            "2024-07-23 15:04:05 UTC+0000 100% %q"
        );
        assert_eq!(strftime("%a %e %m", 0), "Thu  1 01");
        // Leap day, and a date before the epoch.
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        assert_eq!(strftime("%Y-%m-%d %a", -86_400), "1969-12-31 Wed");
        assert_eq!(strftime("%Y-%m-%d %j", 1_735_603_200), "2024-12-31 366");
        assert_eq!(strftime("trailing %", 0), "trailing %");
    }

    #[test]
    fn now_is_a_plausible_date() {
        let year: i64 = strftime_now("%Y").parse().expect("a year");
        assert!(year >= 2024, "{year}");
    }
}
