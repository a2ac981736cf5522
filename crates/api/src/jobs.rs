//! `/api/v1/jobs`: backups, restores and gc the server runs, their progress and logs.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::path::{with_query, PathError};

/// The states a job ends in: it changes no more once in one of them.
pub const ENDED: [&str; 3] = ["succeeded", "failed", "cancelled"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: i64,
    /// backup, restore or gc.
    pub kind: String,
    pub item: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    pub state: String,
    pub attempt: u32,
    pub created: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub error: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second while running (or over the whole run once ended).
    pub rate: Option<f64>,
    /// Seconds left at the current rate, while running.
    pub eta_secs: Option<f64>,
    /// The recovery point a backup made.
    pub point: Option<String>,
    pub requested_by: String,
    /// For a failed job: the class of its error (bad_request, not_found, busy, damaged,
    /// wrong_passphrase, forbidden, unavailable, internal, ...), as API errors have it.
    pub error_code: Option<String>,
}

impl Job {
    /// Whether the job has ended (it changes no more).
    pub fn ended(&self) -> bool {
        ENDED.contains(&self.state.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    pub log: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub time: String,
    pub line: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
pub struct JobQuery {
    /// queued, running, succeeded, failed or cancelled.
    pub state: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<u32>,
    /// Jobs older than this id (the last id of the previous page).
    pub before: Option<i64>,
}

// The answer to a request that queued a job (an on-demand backup, a restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobRef {
    pub job: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cancelled {
    pub id: i64,
    /// `cancelled` (it had not started) or `cancelling` (it stops at its next chunk).
    pub state: String,
}

/// `GET` (`Vec<Job>`, newest first).
pub fn list_path(q: &JobQuery) -> Result<String, PathError> {
    with_query("/jobs", q)
}

/// `GET` (`JobDetail`).
pub fn job_path(id: i64) -> String {
    format!("/jobs/{id}")
}

/// `POST` (answered with `Cancelled`).
pub fn cancel_path(id: i64) -> String {
    format!("/jobs/{id}/cancel")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(rate: f64) -> JobDetail {
        JobDetail {
            job: Job {
                id: 7,
                kind: "backup".into(),
                item: Some("web01".into()),
                state: "running".into(),
                attempt: 1,
                created: "2024-05-01T02:00:00.000Z".into(),
                started: Some("2024-05-01T02:00:01.000Z".into()),
                ended: None,
                error: None,
                bytes_done: u64::MAX,
                bytes_total: u64::MAX,
                rate: Some(rate),
                eta_secs: Some(rate / 3.0),
                point: None,
                requested_by: "admin".into(),
                error_code: None,
            },
            log: vec![LogLine {
                time: "2024-05-01T02:00:01.000Z".into(),
                line: "reading disk0".into(),
            }],
        }
    }

    /// What a client reads and prints back is what the server wrote: the flattened job
    /// and its log, every `null`, and each f64 to its last bit.
    #[test]
    fn a_job_reads_back_as_it_was_written() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let rate = f64::from_bits(x >> 2) % 1e12;
            let j = job(rate);
            let text = serde_json::to_string(&j).unwrap();
            let back: JobDetail = serde_json::from_str(&text).unwrap();
            assert_eq!(back, j, "{text}");
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
        }
        let v = serde_json::to_value(job(1.5)).unwrap();
        assert_eq!(v["id"], 7);
        assert!(
            v["ended"].is_null() && v["log"][0]["line"] == "reading disk0",
            "{v}"
        );
    }
}
