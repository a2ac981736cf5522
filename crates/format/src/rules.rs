//! The vault's rules as stored objects (docs/format.md, "Vault rules" and "Deletion marker"):
//! what a recovery point's retention is, whether the vault is locked, how long a deleted point
//! stays restorable, and which points are deleted. Each is sealed in its own envelope kind, so
//! in an encrypted vault a forged or altered one fails its tag and is damage, not a silent
//! unlock or a silent deletion.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, FormatError};
use crate::{valid_name, PointId, NAME_RULE};

/// How many of each period a policy keeps (the restic / Proxmox rules, see the store's
/// `retention` module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keep {
    #[serde(default)]
    pub last: u32,
    #[serde(default)]
    pub hourly: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
    #[serde(default)]
    pub yearly: u32,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }

    /// `last 3, daily 7` as listings and audit lines say it.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The retention a recovery point was taken under, recorded in its manifest (version 2) so
/// that no later change (a shorter policy, another time zone, unprotecting the VM) can shorten
/// it while the vault is locked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PointRetention {
    /// No end was given (a CLI backup, or a point of manifest version 1): kept until a prune
    /// or a delete removes it, and never removed from a locked vault.
    #[default]
    None,
    /// On demand: kept until this time (RFC 3339, UTC), and never counted by a policy.
    Until { until: String },
    /// Taken on a policy's schedule: kept while these rules, in this time zone (an IANA name),
    /// keep it among the VM's scheduled points.
    Policy {
        policy: String,
        keep: Keep,
        time_zone: String,
    },
}

impl PointRetention {
    /// One line for listings and refusals: `policy daily (daily 7)`, `until 2027-01-01T...`.
    pub fn describe(&self) -> String {
        match self {
            PointRetention::None => "no end given".into(),
            PointRetention::Until { until } => format!("kept until {until}"),
            PointRetention::Policy { policy, keep, .. } => {
                format!("policy '{policy}' ({})", keep.describe())
            }
        }
    }
}

pub const RULES_VERSION: u32 = 1;
pub const DELETION_VERSION: u32 = 1;
/// The soft-delete window of a vault that says nothing else (the cloud services' default).
pub const DEFAULT_SOFT_DELETE_DAYS: u32 = 14;
/// The longest soft-delete window a vault may have.
pub const MAX_SOFT_DELETE_DAYS: u32 = 180;
/// Rules and deletion markers are a few hundred bytes; anything larger is refused unread.
pub const MAX_RULES_LEN: u64 = 64 * 1024;

/// How long a locked vault asks its storage to hold each object it writes, unless told.
pub const DEFAULT_HOLD_DAYS: u32 = 30;
/// The longest storage hold a vault may ask for (ten years).
pub const MAX_HOLD_DAYS: u32 = 3650;

/// Who locked the vault, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    /// RFC 3339, UTC.
    pub at: String,
    pub by: String,
    /// Days the storage is asked to hold every object written (S3 Object Lock, compliance
    /// mode), where it can. Absent in vaults locked before storage holds existed: those ask
    /// for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_days: Option<u32>,
}

/// The vault's rules object (`rules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultRules {
    pub version: u32,
    /// How long a deleted point stays restorable; 0 = deletions are immediate (never in a
    /// locked vault).
    pub soft_delete_days: u32,
    /// Set once, never cleared: the vault is immutable.
    pub locked: Option<Locked>,
}

impl Default for VaultRules {
    fn default() -> VaultRules {
        VaultRules {
            version: RULES_VERSION,
            soft_delete_days: DEFAULT_SOFT_DELETE_DAYS,
            locked: None,
        }
    }
}

impl VaultRules {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rules serialise")
    }

    pub fn decode(b: &[u8]) -> Result<VaultRules, FormatError> {
        const WHAT: &str = "vault rules";
        let r: VaultRules = serde_json::from_slice(b).map_err(|e| invalid(WHAT, e.to_string()))?;
        if r.version != RULES_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: r.version,
                supported: RULES_VERSION,
            });
        }
        if r.soft_delete_days > MAX_SOFT_DELETE_DAYS {
            return Err(invalid(
                WHAT,
                format!("soft delete of {} days", r.soft_delete_days),
            ));
        }
        if r.locked.is_some() && r.soft_delete_days == 0 {
            return Err(invalid(WHAT, "locked without soft delete"));
        }
        if let Some(days) = r.locked.as_ref().and_then(|l| l.hold_days) {
            if !(1..=MAX_HOLD_DAYS).contains(&days) {
                return Err(invalid(WHAT, format!("a storage hold of {days} days")));
            }
        }
        Ok(r)
    }
}

/// Why a point was deleted, kept in its marker and shown by `points --deleted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deletion {
    pub version: u32,
    /// The point it deletes: a marker copied to another point's name is refused.
    pub point: PointId,
    /// RFC 3339, UTC, by the deleting host's clock.
    pub deleted_at: String,
    pub by: String,
    /// `point delete`, `prune (keep last 3)`, `retention: policy 'daily' (daily 7)`.
    pub reason: String,
}

impl Deletion {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("deletion serialises")
    }

    pub fn decode(b: &[u8], point: &PointId) -> Result<Deletion, FormatError> {
        const WHAT: &str = "deletion marker";
        let d: Deletion = serde_json::from_slice(b).map_err(|e| invalid(WHAT, e.to_string()))?;
        if d.version != DELETION_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: d.version,
                supported: DELETION_VERSION,
            });
        }
        if d.point != *point {
            return Err(invalid(WHAT, format!("it names point {}", d.point)));
        }
        Ok(d)
    }
}

/// Checks what a recorded retention names, as [`crate::Manifest::decode`] does.
pub(crate) fn check_retention(r: &PointRetention) -> Result<(), String> {
    match r {
        PointRetention::None => Ok(()),
        PointRetention::Until { until } => chrono::DateTime::parse_from_rfc3339(until)
            .map(|_| ())
            .map_err(|_| format!("keep-until {until:?} is not an RFC 3339 time")),
        PointRetention::Policy {
            policy, time_zone, ..
        } => {
            if !valid_name(policy) {
                return Err(format!("policy name {policy:?} is not {NAME_RULE}"));
            }
            if time_zone.is_empty() || time_zone.len() > 64 {
                return Err(format!("time zone {time_zone:?}"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_and_refuse_what_is_never_written() {
        let r = VaultRules {
            locked: Some(Locked {
                at: "2026-12-02T10:00:00Z".into(),
                by: "alice".into(),
                hold_days: None,
            }),
            ..VaultRules::default()
        };
        assert_eq!(VaultRules::decode(&r.encode()).unwrap(), r);
        // A vault locked before storage holds existed says nothing of them, and reads back so.
        assert!(!String::from_utf8(r.encode()).unwrap().contains("hold"));
        let held =
            br#"{"version":1,"soft_delete_days":14,"locked":{"at":"x","by":"y","hold_days":30}}"#;
        assert_eq!(
            VaultRules::decode(held).unwrap().locked.unwrap().hold_days,
            Some(30)
        );
        for days in [0, MAX_HOLD_DAYS + 1] {
            let text = format!(
                r#"{{"version":1,"soft_delete_days":14,"locked":{{"at":"x","by":"y","hold_days":{days}}}}}"#
            );
            assert!(VaultRules::decode(text.as_bytes()).is_err(), "{days}");
        }
        let unlocked_off = br#"{"version":1,"soft_delete_days":0,"locked":{"at":"x","by":"y"}}"#;
        assert!(VaultRules::decode(unlocked_off).is_err());
        assert!(
            VaultRules::decode(br#"{"version":2,"soft_delete_days":1,"locked":null}"#).is_err()
        );
        assert!(
            VaultRules::decode(br#"{"version":1,"soft_delete_days":1,"locked":null,"x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn a_marker_names_its_point() {
        let p = PointId([7; 16]);
        let d = Deletion {
            version: 1,
            point: p,
            deleted_at: "2026-12-02T10:00:00Z".into(),
            by: "bob".into(),
            reason: "point delete".into(),
        };
        assert_eq!(Deletion::decode(&d.encode(), &p).unwrap(), d);
        assert!(Deletion::decode(&d.encode(), &PointId([8; 16])).is_err());
    }

    #[test]
    fn retention_serialises_tagged() {
        let r = PointRetention::Policy {
            policy: "daily".into(),
            keep: Keep {
                daily: 7,
                ..Keep::default()
            },
            time_zone: "Europe/Berlin".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"kind":"policy","policy":"daily","keep":{"last":0,"hourly":0,"daily":7,"weekly":0,"monthly":0,"yearly":0},"time_zone":"Europe/Berlin"}"#
        );
        assert_eq!(serde_json::from_str::<PointRetention>(&s).unwrap(), r);
        assert!(check_retention(&PointRetention::Until {
            until: "soon".into()
        })
        .is_err());
    }
}
