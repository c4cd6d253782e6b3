//! Dates for partition names and `x-amz-date`, from the SDK clock and the
//! events' RFC 3339 timestamps.

use chrono::{DateTime, Utc};

/// An instant of the SDK clock (milliseconds since the Unix epoch).
pub fn from_unix_millis(millis: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis as i64).unwrap_or_default()
}

/// `YYYYMMDDTHHMMSSZ`, the form of `x-amz-date`.
pub fn amz_date(at: &DateTime<Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

/// An RFC 3339 date-time such as `2024-05-01T14:00:00+02:00`, in UTC.
/// `None` if the text is not one.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_clock_formats_as_an_amz_date() {
        // The mock host's clock: 2024-01-01T00:00:00Z.
        assert_eq!(
            amz_date(&from_unix_millis(1_704_067_200_000)),
            "20240101T000000Z"
        );
        assert_eq!(
            amz_date(&from_unix_millis(1_369_353_600_999)),
            "20130524T000000Z"
        );
        assert_eq!(
            amz_date(&from_unix_millis(951_825_599_000)),
            "20000229T115959Z"
        );
    }

    #[test]
    fn rfc3339_timestamps_are_read_in_utc() {
        let seconds = |text| parse_rfc3339(text).map(|at| at.timestamp());
        assert_eq!(seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(seconds("2024-05-01T12:00:00.000Z"), Some(1_714_564_800));
        assert_eq!(
            seconds("2024-05-01T14:30:00.123456+02:30"),
            Some(1_714_564_800)
        );
        assert_eq!(seconds("2024-04-30T23:00:00-13:00"), Some(1_714_564_800));
        assert_eq!(seconds("1969-12-31T23:59:59Z"), Some(-1));
        assert_eq!(seconds("2024-02-29T00:00:00Z"), Some(1_709_164_800));
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for text in [
            "",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024/05/01T12:00:00Z",
            "yesterday at noon",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }
}
