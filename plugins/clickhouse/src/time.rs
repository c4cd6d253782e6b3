//! RFC 3339 in, ClickHouse's basic date-time text out.

use chrono::{DateTime, SecondsFormat, Utc};

/// An RFC 3339 date-time such as `2024-05-01T14:00:00.123+02:00`, in UTC.
/// `None` if the text is not one.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// An instant of the SDK clock (milliseconds since the Unix epoch).
pub fn from_unix_millis(millis: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis as i64).unwrap_or_default()
}

/// `YYYY-MM-DD hh:mm:ss.fff` in UTC: what a `DateTime64(3, 'UTC')` column
/// reads with ClickHouse's default `date_time_input_format`. Digits past the
/// millisecond are dropped.
pub fn clickhouse_datetime64(at: &DateTime<Utc>) -> String {
    // RFC 3339 with milliseconds, then ClickHouse's separators.
    let text = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(text: &str) -> Option<String> {
        parse_rfc3339(text).map(|at| clickhouse_datetime64(&at))
    }

    #[test]
    fn rfc3339_becomes_utc_with_milliseconds() {
        for (given, expected) in [
            ("2024-05-01T12:00:00.000Z", "2024-05-01 12:00:00.000"),
            ("2024-05-01T12:00:00Z", "2024-05-01 12:00:00.000"),
            ("2024-05-01T12:00:00.5Z", "2024-05-01 12:00:00.500"),
            ("2024-05-01T12:00:00.123456789Z", "2024-05-01 12:00:00.123"),
            ("2024-05-02T01:30:00.250+02:00", "2024-05-01 23:30:00.250"),
            ("2024-02-28T23:00:00-01:00", "2024-02-29 00:00:00.000"),
            ("1969-12-31T23:59:59.999Z", "1969-12-31 23:59:59.999"),
        ] {
            assert_eq!(convert(given).as_deref(), Some(expected), "{given}");
        }
    }

    #[test]
    fn the_sdk_clock_converts_too() {
        assert_eq!(
            clickhouse_datetime64(&from_unix_millis(1_704_067_200_042)),
            "2024-01-01 00:00:00.042"
        );
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for text in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T12:00:00.Z",
            "1714564800",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }
}
