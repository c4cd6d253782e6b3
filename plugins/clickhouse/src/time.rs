//! RFC 3339 in, ClickHouse's basic date-time text out. The plugin has the
//! host's clock as milliseconds and event timestamps as RFC 3339 text, and
//! no date library that builds for wasm32 without a system clock.

/// Milliseconds since the Unix epoch of an RFC 3339 date-time such as
/// `2024-05-01T12:00:00.123Z` or `2024-05-01T14:00:00+02:00`. Digits past
/// the millisecond are dropped. `None` if the text is not one.
pub fn parse_rfc3339_millis(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = bytes.get(range)?;
        digits.iter().try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    };
    let year = number(0..4)?;
    let month = number(5..7)?;
    let day = number(8..10)?;
    let hour = number(11..13)?;
    let minute = number(14..16)?;
    let second = number(17..19)?;
    let separators_ok = bytes.get(4) == Some(&b'-')
        && bytes.get(7) == Some(&b'-')
        && matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        && bytes.get(13) == Some(&b':')
        && bytes.get(16) == Some(&b':');
    let fields_ok = (1..=12).contains(&month)
        && (1..=days_in_month(i64::from(year), month)).contains(&day)
        && hour < 24
        && minute < 60
        // 60 is a leap second.
        && second <= 60;
    if !separators_ok || !fields_ok {
        return None;
    }

    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, digit) in fraction.bytes().take(3).enumerate() {
            if i < digits {
                millis = millis * 10 + i64::from(digit - b'0');
            }
        }
        for _ in digits..3 {
            millis *= 10;
        }
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = rest.as_bytes();
            if offset.len() != 6 || offset[3] != b':' {
                return None;
            }
            let hours = rest[1..3].parse::<i64>().ok()?;
            let minutes = rest[4..6].parse::<i64>().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
    };

    let days = days_from_civil(i64::from(year), month, day);
    let local = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second.min(59));
    Some((local - offset_seconds) * 1000 + millis)
}

/// `YYYY-MM-DD hh:mm:ss.fff` in UTC: what a `DateTime64(3, 'UTC')` column
/// reads with ClickHouse's default `date_time_input_format`.
pub fn clickhouse_datetime64(unix_millis: i64) -> String {
    let seconds = unix_millis.div_euclid(1000);
    let millis = unix_millis.rem_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let in_day = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date. Counts in 400-year
/// eras that start on March 1st, so the leap day ends each era's year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(text: &str) -> Option<String> {
        parse_rfc3339_millis(text).map(clickhouse_datetime64)
    }

    #[test]
    fn rfc3339_becomes_utc_with_milliseconds() {
        assert_eq!(
            convert("2024-05-01T12:00:00.000Z").as_deref(),
            Some("2024-05-01 12:00:00.000")
        );
        assert_eq!(
            convert("2024-05-01T12:00:00Z").as_deref(),
            Some("2024-05-01 12:00:00.000")
        );
        assert_eq!(
            convert("2024-05-01T12:00:00.5Z").as_deref(),
            Some("2024-05-01 12:00:00.500")
        );
        assert_eq!(
            convert("2024-05-01T12:00:00.123456789Z").as_deref(),
            Some("2024-05-01 12:00:00.123")
        );
        assert_eq!(
            convert("2024-05-02T01:30:00.250+02:00").as_deref(),
            Some("2024-05-01 23:30:00.250")
        );
        assert_eq!(
            convert("2024-02-28T23:00:00-01:00").as_deref(),
            Some("2024-02-29 00:00:00.000")
        );
        assert_eq!(
            convert("1969-12-31T23:59:59.999Z").as_deref(),
            Some("1969-12-31 23:59:59.999")
        );
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for text in [
            "",
            "2024-05-01",
            "2024-05-01 12:00:00",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0200",
            "1714564800",
        ] {
            assert_eq!(parse_rfc3339_millis(text), None, "{text}");
        }
    }

    #[test]
    fn days_and_dates_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }
}
