//! Schedules as calendar events in a time zone, and the clock they are computed with.
//!
//! Forms: `hourly`, `every N hours` (at minute 0 of the hours divisible by N, like systemd's
//! `0/N:00`), `daily HH:MM[,HH:MM...]`, `weekly mon,thu HH:MM[,HH:MM...]`. Times are wall-clock
//! times in the policy's zone. A time that does not exist (a DST gap) runs at the first valid
//! instant after it; a time that exists twice (a DST overlap) runs once, at the first.

use std::sync::Mutex;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime};
use chrono::{TimeZone, Utc, Weekday};
use chrono_tz::Tz;

use crate::{Error, Result};

/// Where "now" comes from: the system clock in the server, a hand-driven one in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until told to move: schedules are tested with it.
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> ManualClock {
        ManualClock(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// Minute 0 of every hour whose number is divisible by the step (1: every hour).
    Hours(u32),
    Daily(Vec<NaiveTime>),
    Weekly(Vec<Weekday>, Vec<NaiveTime>),
}

/// A parsed calendar event in its zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    event: Event,
    tz: Tz,
}

fn bad(text: &str, why: &str) -> Error {
    Error::Input(format!(
        "schedule '{text}': {why} (use 'hourly', 'every N hours', 'daily HH:MM[,HH:MM]' or \
         'weekly mon,thu HH:MM')"
    ))
}

fn parse_times(text: &str, list: &str) -> Result<Vec<NaiveTime>> {
    let mut times = Vec::new();
    for t in list.split(',') {
        let time = NaiveTime::parse_from_str(t.trim(), "%H:%M")
            .map_err(|_| bad(text, &format!("'{t}' is not a time HH:MM")))?;
        times.push(time);
    }
    times.sort();
    times.dedup();
    Ok(times)
}

fn parse_day(text: &str, d: &str) -> Result<Weekday> {
    let day = match d.trim().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return Err(bad(text, &format!("'{d}' is not a day of the week"))),
    };
    Ok(day)
}

/// Checks a time zone name (IANA, e.g. `Europe/Berlin`).
pub fn parse_tz(name: &str) -> Result<Tz> {
    name.parse::<Tz>().map_err(|_| {
        Error::Input(format!(
            "'{name}' is not a time zone (e.g. Europe/Berlin, UTC)"
        ))
    })
}

impl Schedule {
    pub fn parse(text: &str, tz: &str) -> Result<Schedule> {
        let tz = parse_tz(tz)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let event = match words.as_slice() {
            ["hourly"] => Event::Hours(1),
            ["every", n, "hours" | "hour"] => {
                let n: u32 = n
                    .parse()
                    .map_err(|_| bad(text, &format!("'{n}' is not a number of hours")))?;
                if !(1..=23).contains(&n) {
                    return Err(bad(text, "N must be between 1 and 23"));
                }
                Event::Hours(n)
            }
            ["daily", rest @ ..] if !rest.is_empty() => {
                Event::Daily(parse_times(text, &rest.concat())?)
            }
            ["weekly", days, rest @ ..] if !rest.is_empty() => {
                let mut list = Vec::new();
                for d in days.split(',') {
                    list.push(parse_day(text, d)?);
                }
                Event::Weekly(list, parse_times(text, &rest.concat())?)
            }
            _ => return Err(bad(text, "not understood")),
        };
        Ok(Schedule { event, tz })
    }

    /// The longest time between two runs: a VM with no successful backup for longer than
    /// this (plus slack) is overdue.
    pub fn period(&self) -> Duration {
        match &self.event {
            Event::Hours(n) => Duration::hours(i64::from(*n)),
            Event::Daily(_) => Duration::days(1),
            Event::Weekly(..) => Duration::weeks(1),
        }
    }

    /// Wall-clock times of one local day at which the event fires.
    fn times_on(&self, day: NaiveDate) -> Vec<NaiveTime> {
        match &self.event {
            Event::Hours(n) => (0..24)
                .filter(|h| h % n == 0)
                .filter_map(|h| NaiveTime::from_hms_opt(h, 0, 0))
                .collect(),
            Event::Daily(times) => times.clone(),
            Event::Weekly(days, times) if days.contains(&day.weekday()) => times.clone(),
            Event::Weekly(..) => Vec::new(),
        }
    }

    /// The instant a wall-clock time stands for: the first of two in an overlap, the end of
    /// the gap for one that does not exist.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => {
                // Gaps are at most a few hours and start on whole minutes: the first minute
                // after the gap is the instant the clocks jumped to.
                (1..=24 * 60).find_map(|m| {
                    match self.tz.from_local_datetime(&(local + Duration::minutes(m))) {
                        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
                        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
                        LocalResult::None => None,
                    }
                })
            }
        }
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> DateTime<Utc> {
        let start = after.with_timezone(&self.tz).date_naive() - Duration::days(1);
        let mut best: Option<DateTime<Utc>> = None;
        // Nine days hold at least one run of every form, whatever the gap or overlap.
        for d in 0..9 {
            let day = start + Duration::days(d);
            for t in self.times_on(day) {
                if let Some(at) = self.resolve(day.and_time(t)) {
                    if at > after && best.is_none_or(|b| at < b) {
                        best = Some(at);
                    }
                }
            }
            if best.is_some() && d >= 2 {
                break;
            }
        }
        // Every form fires at least weekly, so a run is always found; a week on is the
        // fallback that keeps this total.
        best.unwrap_or(after + Duration::weeks(1))
    }

    pub fn timezone(&self) -> &Tz {
        &self.tz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn runs(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        let mut t = utc(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t);
                t.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn forms_parse_and_bad_ones_are_refused() {
        for ok in [
            "hourly",
            "every 6 hours",
            "daily 02:00",
            "daily 02:00,14:30",
            "weekly mon,thu 03:15",
        ] {
            Schedule::parse(ok, "UTC").unwrap();
        }
        for bad in [
            "",
            "daily",
            "daily 25:00",
            "every 0 hours",
            "weekly xyz 01:00",
            "monthly",
        ] {
            assert!(Schedule::parse(bad, "UTC").is_err(), "{bad}");
        }
        assert!(Schedule::parse("hourly", "Mars/Olympus").is_err());
    }

    #[test]
    fn daily_weekly_and_every_n_hours() {
        let s = Schedule::parse("daily 02:00,14:30", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-03-01T03:00:00Z", 3),
            [
                "2026-03-01T14:30:00+00:00",
                "2026-03-02T02:00:00+00:00",
                "2026-03-02T14:30:00+00:00"
            ]
        );
        // 2026-03-02 is a Monday.
        let s = Schedule::parse("weekly mon,thu 03:15", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-03-02T03:15:00Z", 2),
            ["2026-03-05T03:15:00+00:00", "2026-03-09T03:15:00+00:00"]
        );
        let s = Schedule::parse("every 8 hours", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-03-01T07:59:59Z", 3),
            [
                "2026-03-01T08:00:00+00:00",
                "2026-03-01T16:00:00+00:00",
                "2026-03-02T00:00:00+00:00"
            ]
        );
    }

    #[test]
    fn dst_gap_runs_at_the_next_valid_instant_and_overlap_runs_once() {
        // Berlin springs forward on 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
        let s = Schedule::parse("daily 02:30", "Europe/Berlin").unwrap();
        assert_eq!(
            runs(&s, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        // And falls back on 2026-10-25: 02:30 happens twice (00:30 and 01:30 UTC).
        assert_eq!(
            runs(&s, "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
        // Hourly over the fall-back night: 02:00 local runs once, then 03:00 local.
        let s = Schedule::parse("hourly", "Europe/Berlin").unwrap();
        assert_eq!(
            runs(&s, "2026-10-24T23:30:00Z", 4),
            [
                "2026-10-25T00:00:00+00:00",
                "2026-10-25T02:00:00+00:00",
                "2026-10-25T03:00:00+00:00",
                "2026-10-25T04:00:00+00:00"
            ]
        );
    }
}
