//! Time in queries: dates as written (absolute or relative to now),
//! resolved in the project's time zone, and the intervals a trend is
//! bucketed into. Buckets start at local midnight (or the local hour, the
//! Monday, the first of the month), so a day is a day on the wall clock even
//! across a daylight-saving change.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, Months, NaiveDate, NaiveDateTime, TimeZone,
    Timelike, Utc,
};
use chrono_tz::Tz;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    Hour,
    Day,
    Week,
    Month,
}

impl Interval {
    pub fn parse(text: &str) -> Option<Interval> {
        match text {
            "hour" => Some(Interval::Hour),
            "day" => Some(Interval::Day),
            "week" => Some(Interval::Week),
            "month" => Some(Interval::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelativeUnit {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

/// A date as a query writes it.
#[derive(Clone, Debug, PartialEq)]
pub enum DateSpec {
    /// `-7d`: so many units before now, from the start of that hour or day.
    Relative(u32, RelativeUnit),
    /// `2026-01-31`: the whole local day.
    Date(NaiveDate),
    /// `2026-01-31T12:00:00`: a local wall-clock time.
    Local(NaiveDateTime),
    /// `2026-01-31T12:00:00Z` or with an offset.
    Instant(DateTime<Utc>),
    Now,
}

impl DateSpec {
    pub fn parse(text: &str) -> Option<DateSpec> {
        let text = text.trim();
        if text == "now" {
            return Some(DateSpec::Now);
        }
        if let Some(rest) = text.strip_prefix('-') {
            let unit = match rest.chars().last()? {
                'h' => RelativeUnit::Hour,
                'd' => RelativeUnit::Day,
                'w' => RelativeUnit::Week,
                'm' => RelativeUnit::Month,
                'y' => RelativeUnit::Year,
                _ => return None,
            };
            let amount: u32 = rest[..rest.len() - 1].parse().ok()?;
            // Beyond a century, the arithmetic below could leave chrono's range.
            return (amount <= 100 * 366).then_some(DateSpec::Relative(amount, unit));
        }
        if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            return Some(DateSpec::Date(date));
        }
        if let Ok(at) = DateTime::parse_from_rfc3339(text) {
            return Some(DateSpec::Instant(at.to_utc()));
        }
        for format in [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%d %H:%M:%S%.f",
        ] {
            if let Ok(local) = NaiveDateTime::parse_from_str(text, format) {
                return Some(DateSpec::Local(local));
            }
        }
        None
    }

    /// The instant this date stands for. A bare date means the start of the
    /// day as `date_from` and the end of it as `date_to`, so
    /// `2026-01-01`..`2026-01-31` is the whole of January.
    pub fn resolve(&self, tz: Tz, now: DateTime<Utc>, is_end: bool) -> Option<DateTime<Utc>> {
        let local_now = now.with_timezone(&tz).naive_local();
        match self {
            DateSpec::Now => Some(now),
            DateSpec::Instant(at) => Some(*at),
            DateSpec::Local(local) => Some(resolve_local(tz, *local)),
            DateSpec::Date(date) => {
                let date = if is_end { date.succ_opt()? } else { *date };
                Some(start_of_day(tz, date))
            }
            DateSpec::Relative(n, RelativeUnit::Hour) => {
                let hour_start = hour_bucket(tz, now);
                hour_start.checked_sub_signed(Duration::hours(i64::from(*n)))
            }
            DateSpec::Relative(n, unit) => {
                let today = local_now.date();
                let date = match unit {
                    RelativeUnit::Day => today.checked_sub_signed(Duration::days(i64::from(*n)))?,
                    RelativeUnit::Week => {
                        today.checked_sub_signed(Duration::days(7 * i64::from(*n)))?
                    }
                    RelativeUnit::Month => today.checked_sub_months(Months::new(*n))?,
                    RelativeUnit::Year => {
                        today.checked_sub_months(Months::new(n.checked_mul(12)?))?
                    }
                    RelativeUnit::Hour => unreachable!(),
                };
                Some(start_of_day(tz, date))
            }
        }
    }
}

/// The instant of a local wall-clock time. A time that occurs twice (the
/// hour repeated when clocks go back) means its first occurrence; one that
/// never occurs (skipped when clocks go forward) means the first instant
/// after the gap.
fn resolve_local(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..(4 * 24 * 2) {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(at) => return at.to_utc(),
            LocalResult::Ambiguous(first, _) => return first.to_utc(),
            LocalResult::None => {
                // In a gap: move to the next quarter hour, where every
                // zone's transitions fall.
                let minute = probe.minute() - probe.minute() % 15;
                probe = probe.with_minute(minute).unwrap().with_second(0).unwrap()
                    + Duration::minutes(15);
            }
        }
    }
    // No zone has a gap of two days; treat the time as UTC if one did.
    local.and_utc()
}

fn start_of_day(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    resolve_local(tz, date.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// The start of the local hour that `at` falls in: `at` less its local
/// minutes and seconds, which is well defined even in a repeated hour.
fn hour_bucket(tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    let local = at.with_timezone(&tz);
    at - Duration::seconds(i64::from(local.minute() * 60 + local.second()))
        - Duration::nanoseconds(i64::from(local.nanosecond()))
}

/// The start of the bucket that `at` falls in.
pub fn bucket_start(interval: Interval, tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    let date = at.with_timezone(&tz).date_naive();
    match interval {
        Interval::Hour => hour_bucket(tz, at),
        Interval::Day => start_of_day(tz, date),
        Interval::Week => start_of_day(
            tz,
            date - Duration::days(i64::from(date.weekday().num_days_from_monday())),
        ),
        Interval::Month => start_of_day(tz, date.with_day(1).expect("day 1 exists")),
    }
}

/// The buckets of a trend: the start of each interval from the one holding
/// `from` up to `to`.
#[derive(Clone, Debug)]
pub struct Buckets {
    starts: Vec<DateTime<Utc>>,
    /// The starts formatted as stored timestamps are, so a stored timestamp
    /// finds its bucket by comparing text.
    keys: Vec<String>,
    tz: Tz,
}

impl Buckets {
    /// `None` if there would be more than `max` buckets.
    pub fn new(
        interval: Interval,
        tz: Tz,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        max: usize,
    ) -> Option<Buckets> {
        let mut starts = Vec::new();
        let mut start = bucket_start(interval, tz, from);
        while start < to {
            if starts.len() == max {
                return None;
            }
            starts.push(start);
            let local = start.with_timezone(&tz).date_naive();
            let next = match interval {
                // An hour bucket can be shorter than an hour only where a
                // zone moves its clocks by less than an hour; stepping an
                // hour then re-bucketing lands on the next one.
                Interval::Hour => hour_bucket(tz, start + Duration::hours(1)),
                Interval::Day => start_of_day(tz, local.succ_opt()?),
                Interval::Week => start_of_day(tz, local + Duration::days(7)),
                Interval::Month => start_of_day(tz, local.checked_add_months(Months::new(1))?),
            };
            if next <= start {
                return None;
            }
            start = next;
        }
        let keys = starts
            .iter()
            .map(|s| crate::model::format_timestamp(*s))
            .collect();
        Some(Buckets { starts, keys, tz })
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The bucket of a stored timestamp (`2026-01-31T12:00:00.000Z`), which
    /// must not be before the first bucket.
    pub fn index_of(&self, stored_timestamp: &str) -> Option<usize> {
        self.keys
            .partition_point(|key| key.as_str() <= stored_timestamp)
            .checked_sub(1)
    }

    /// Each bucket's start in local time with its UTC offset.
    pub fn labels(&self) -> Vec<String> {
        self.starts
            .iter()
            .map(|s| {
                s.with_timezone(&self.tz)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .collect()
    }
}

/// Milliseconds since the epoch of a stored timestamp.
pub fn stored_millis(stored_timestamp: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(stored_timestamp)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn relative_dates_start_at_the_local_day_or_hour() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let now = utc("2026-11-20T15:30:00Z"); // 10:30 in New York
        let spec = DateSpec::parse("-7d").unwrap();
        assert_eq!(
            spec.resolve(tz, now, false).unwrap(),
            utc("2026-11-13T05:00:00Z")
        );
        let spec = DateSpec::parse("-24h").unwrap();
        assert_eq!(
            spec.resolve(tz, now, false).unwrap(),
            utc("2026-11-19T15:00:00Z")
        );
        let spec = DateSpec::parse("-1m").unwrap();
        assert_eq!(
            spec.resolve(tz, now, false).unwrap(),
            utc("2026-10-20T04:00:00Z")
        );
        assert_eq!(DateSpec::parse("-7x"), None);
        assert_eq!(DateSpec::parse("-d"), None);
    }

    #[test]
    fn a_bare_date_is_the_whole_local_day() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let now = utc("2026-11-20T00:00:00Z");
        let date = DateSpec::parse("2026-07-01").unwrap();
        assert_eq!(
            date.resolve(tz, now, false).unwrap(),
            utc("2026-06-30T22:00:00Z")
        );
        assert_eq!(
            date.resolve(tz, now, true).unwrap(),
            utc("2026-07-01T22:00:00Z")
        );
    }

    #[test]
    fn days_follow_the_wall_clock_across_daylight_saving() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let buckets = Buckets::new(
            Interval::Day,
            tz,
            utc("2026-10-31T04:00:00Z"),
            utc("2026-11-03T05:00:00Z"),
            100,
        )
        .unwrap();
        assert_eq!(
            buckets.labels(),
            [
                "2026-10-31T00:00:00-04:00",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00"
            ]
        );
        // 23:30 on Nov 1 in New York is 04:30 UTC on Nov 2.
        assert_eq!(buckets.index_of("2026-11-02T04:30:00.000Z"), Some(1));
        assert_eq!(buckets.index_of("2026-11-02T05:00:00.000Z"), Some(2));
    }

    #[test]
    fn the_repeated_hour_is_two_buckets() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let buckets = Buckets::new(
            Interval::Hour,
            tz,
            utc("2026-11-01T04:00:00Z"),
            utc("2026-11-01T08:00:00Z"),
            100,
        )
        .unwrap();
        assert_eq!(
            buckets.labels(),
            [
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let tz = Tz::UTC;
        let from = utc("2026-11-04T10:00:00Z"); // a Wednesday
        let weeks =
            Buckets::new(Interval::Week, tz, from, utc("2026-11-17T00:00:00Z"), 10).unwrap();
        assert_eq!(
            weeks.labels(),
            [
                "2026-11-02T00:00:00Z",
                "2026-11-09T00:00:00Z",
                "2026-11-16T00:00:00Z"
            ]
        );
        let months =
            Buckets::new(Interval::Month, tz, from, utc("2027-01-02T00:00:00Z"), 10).unwrap();
        assert_eq!(
            months.labels(),
            [
                "2026-11-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z"
            ]
        );
        assert!(Buckets::new(Interval::Hour, tz, from, utc("2027-11-04T00:00:00Z"), 100).is_none());
    }
}
