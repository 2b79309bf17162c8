//! Calendar arithmetic and RFC 3339 without a time-zone database.
//!
//! Everything here works on microseconds since the Unix epoch in UTC (`i64`), the unit of every
//! time column in the lake. Parsing is strict: what it accepts, DuckDB and Spark read back
//! identically.

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;
/// Microseconds in one hour.
pub const MICROS_PER_HOUR: i64 = 3_600 * MICROS_PER_SECOND;
/// Microseconds in one day.
pub const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day number since 1970-01-01 (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The Hive partition values `(date, hour)` of a timestamp, e.g. `("2026-11-27", 15)`.
pub fn partition_of(us: i64) -> (String, u32) {
    let day = us.div_euclid(MICROS_PER_DAY);
    let hour = (us.rem_euclid(MICROS_PER_DAY) / MICROS_PER_HOUR) as u32;
    (format_date(day), hour)
}

/// `YYYY-MM-DD` of a day number since the epoch.
pub fn format_date(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 with millisecond precision and a `Z` offset, e.g. `2026-11-27T15:04:05.123Z`.
pub fn format_rfc3339_millis(us: i64) -> String {
    let day = us.div_euclid(MICROS_PER_DAY);
    let rem = us.rem_euclid(MICROS_PER_DAY);
    let (y, mo, d) = civil_from_days(day);
    let secs = rem / MICROS_PER_SECOND;
    let ms = (rem % MICROS_PER_SECOND) / 1000;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Parses an RFC 3339 date-time (`2026-11-27T15:04:05.123Z`, `...+02:00`, `t`/`z` and a space
/// instead of `T` accepted, any number of fraction digits, sub-µs digits truncated) into µs.
///
/// Returns `None` for anything else, including out-of-range fields and years outside
/// 0000–9999.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let mut v = 0u32;
        for &c in b.get(r)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        Some(v)
    };
    let year = num(0..4)?;
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    // A leap second (60) is accepted by RFC 3339; it is folded onto :59.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_us: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale = 100_000;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            frac_us += i64::from(c - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3600 + om * 60);
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second.min(59))
            - offset_secs;
    Some(secs * MICROS_PER_SECOND + frac_us)
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips_across_eras() {
        for day in [-800_000, -1, 0, 1, 10_957, 20_419, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn parses_and_formats_rfc3339() {
        let us = parse_rfc3339("2026-11-27T15:04:05.123Z").unwrap();
        assert_eq!(format_rfc3339_millis(us), "2026-11-27T15:04:05.123Z");
        assert_eq!(
            parse_rfc3339("2026-11-27T17:04:05.123+02:00"),
            Some(us),
            "offsets are applied"
        );
        assert_eq!(parse_rfc3339("2026-11-27T15:04:05Z"), Some(us - 123_000));
        assert_eq!(
            parse_rfc3339("2026-11-27T15:04:05.123456789Z"),
            Some(us + 456)
        );
        assert_eq!(partition_of(us), ("2026-11-27".to_string(), 15));
    }

    #[test]
    fn rejects_malformed_rfc3339() {
        for s in [
            "",
            "2026-11-27",
            "2026-11-27T15:04:05",
            "2026-13-27T15:04:05Z",
            "2026-02-30T15:04:05Z",
            "2026-11-27T24:04:05Z",
            "2026-11-27T15:04:05.Z",
            "2026-11-27T15:04:05Zjunk",
            "2026-11-27T15:04:05+0200",
            "+2026-11-27T15:04:05Z",
            "2026/11/27T15:04:05Z",
            "1764255845123",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?} must not parse");
        }
    }

    #[test]
    fn partitions_negative_times_on_the_right_day() {
        assert_eq!(partition_of(-1), ("1969-12-31".to_string(), 23));
    }
}
