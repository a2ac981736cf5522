//! `/api/v1/policies`: schedules and retention.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::path::{segment, PathError};

// Both the request (POST, PUT) and the answer; what a body leaves out takes the defaults.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    /// `hourly`, `every N hours`, `daily HH:MM[,HH:MM]`, `weekly mon,thu HH:MM`.
    pub schedule: String,
    /// IANA time zone of the schedule and of retention's periods.
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

fn utc() -> String {
    "UTC".into()
}

impl Policy {
    /// Whether `new` keeps less than `self` by any rule: what the vault lock forbids and a
    /// vault that requires approval sends to a second admin.
    pub fn shortened_by(&self, new: &Policy) -> bool {
        new.keep_last < self.keep_last
            || new.keep_hourly < self.keep_hourly
            || new.keep_daily < self.keep_daily
            || new.keep_weekly < self.keep_weekly
            || new.keep_monthly < self.keep_monthly
            || new.keep_yearly < self.keep_yearly
    }
}

/// `GET` (`Vec<Policy>`), `POST` (`Policy`).
pub const COLLECTION: &str = "/policies";

/// `GET`, `PUT` (`Policy`), `DELETE`.
pub fn policy_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/policies/{}", segment(name)?))
}
