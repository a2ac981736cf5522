//! `/api/v1/jobs`: backups, restores and gc the server runs, their progress and logs.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::path::{with_query, PathError};

wire_words! {
    /// Where a job is: `queued` (waiting for its time or a free slot; a failed backup with
    /// attempts left is queued again), `running`, or ended: `succeeded`, `failed`,
    /// `cancelled`.
    pub enum JobState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

/// The states a job ends in: it changes no more once in one of them.
pub const ENDED: [JobState; 3] = [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

impl JobState {
    /// Whether a job in this state has ended (it changes no more); for a state this side
    /// does not know, see [`Job::ended`].
    pub fn ended(&self) -> bool {
        ENDED.contains(self)
    }
}

wire_words! {
    /// What a cancel did.
    pub enum CancelState {
        /// The job had not started: it is cancelled.
        Cancelled = "cancelled",
        /// The job runs: it stops at its next chunk.
        Cancelling = "cancelling",
        /// The job was starting or had just ended as the cancel came: nothing was done.
        Running = "running",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: i64,
    /// backup, restore or gc.
    pub kind: String,
    pub item: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    #[schema(value_type = String)]
    pub state: JobState,
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
    /// Whether the job has ended (it changes no more). A state this side does not know (a
    /// newer server's) has ended when the server gave the job an end time: a client waiting
    /// for the job neither stops while it goes on nor waits forever once it is over.
    pub fn ended(&self) -> bool {
        match &self.state {
            JobState::Unknown(_) => self.ended.is_some(),
            known => known.ended(),
        }
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
    #[param(value_type = Option<String>)]
    pub state: Option<JobState>,
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
    #[schema(value_type = String)]
    pub state: CancelState,
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
                state: JobState::Running,
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

    /// Each state is its exact word on the wire (the server's database holds the same
    /// words), read back to the same state.
    #[test]
    fn job_states_are_their_wire_words() {
        let words = [
            (JobState::Queued, "queued", false),
            (JobState::Running, "running", false),
            (JobState::Succeeded, "succeeded", true),
            (JobState::Failed, "failed", true),
            (JobState::Cancelled, "cancelled", true),
        ];
        assert_eq!(JobState::KNOWN.len(), words.len());
        for (state, word, ended) in words {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{word}\"")
            );
            assert_eq!(
                serde_json::from_str::<JobState>(&format!("\"{word}\"")).unwrap(),
                state
            );
            assert_eq!(
                (state.as_str(), state.to_string()),
                (word, word.to_string())
            );
            assert_eq!(word.parse::<JobState>(), Ok(state.clone()));
            assert!(state.is_known());
            assert_eq!(state.ended(), ended, "{word}");
        }
        assert_eq!(
            JobState::known_list(),
            "queued, running, succeeded, failed, cancelled"
        );
        let q = JobQuery {
            state: Some(JobState::Failed),
            ..JobQuery::default()
        };
        assert_eq!(list_path(&q).unwrap(), "/jobs?state=failed");
        for (state, word) in [
            (CancelState::Cancelled, "cancelled"),
            (CancelState::Cancelling, "cancelling"),
            (CancelState::Running, "running"),
        ] {
            let c = Cancelled { id: 3, state };
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(text, format!("{{\"id\":3,\"state\":\"{word}\"}}"));
            assert_eq!(serde_json::from_str::<Cancelled>(&text).unwrap(), c);
        }
    }

    /// A state a newer server has and this client does not know is read, not refused: kept
    /// as it was written (printed, written back to the same JSON) and not taken for ended.
    #[test]
    fn an_unknown_state_reads_as_unknown_and_writes_back_as_it_was() {
        let mut v = serde_json::to_value(job(2.0)).unwrap();
        v["state"] = "paused".into();
        let back: JobDetail = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.job.state, JobState::Unknown("paused".into()));
        assert!(!back.job.state.is_known() && !back.job.ended());
        assert_eq!(back.job.state.to_string(), "paused");
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
        // Over by the end time the server gave it.
        let mut over = back.job.clone();
        over.ended = Some("2024-05-01T02:10:00.000Z".into());
        assert!(over.ended() && !over.state.ended());
        let c: Cancelled = serde_json::from_str(r#"{"id":1,"state":"deferred"}"#).unwrap();
        assert_eq!(c.state, CancelState::Unknown("deferred".into()));
        // Only the exact word: no other case, no padding.
        for word in ["Running", "RUNNING", " running", ""] {
            assert_eq!(JobState::from(word), JobState::Unknown(word.into()));
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
