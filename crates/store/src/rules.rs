//! The vault's rules, kept in one place under every caller (CLI, server API, server jobs,
//! garbage collection): soft delete, the lock, and the retention each point was taken under.
//!
//! - **Removing a point** goes only through [`Vault::delete_point`]. With soft delete on (the
//!   default, 14 days), it writes a sealed deletion marker `points/ID.deleted`: the point
//!   stops being listed and chosen, but its manifest, and so its chunks, stay; undelete
//!   removes the marker. Only garbage collection removes the manifest, once the window is over
//!   by both this host's clock and the storage's ([`Vault::purge_expired`]).
//! - **A locked vault** never loses a point while the retention recorded in it is in force
//!   (`retention::in_force`): not by a delete, not by a prune, not by a server's retention,
//!   whatever policy, time zone or protection is in place now. Its soft delete can be made
//!   longer, never shorter or off; the lock is never cleared.
//! - The rules object and the markers are sealed like manifests: in an encrypted vault, one
//!   that was forged or altered fails its tag and is reported as damage. A vault whose rules
//!   object is damaged deletes nothing until it is repaired.
//!
//! What no rule here can stop: someone with the storage's own credentials deleting objects.
//! S3 Object Lock is the storage's answer to that (docs/format.md, "Threat model").

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use vmvault_format::{
    Deletion, Locked, Manifest, ObjectKind, PointId, PointRetention, VaultRules, DELETION_VERSION,
    MAX_HOLD_DAYS, MAX_RULES_LEN, MAX_SOFT_DELETE_DAYS,
};

use crate::backend::Kind;
use crate::vault::Unreadable;
use crate::{retention, Result, StoreError, Vault};

pub(crate) const RULES_NAME: &str = "rules";
/// What vmvault server 0.1 wrote before the rules were sealed (format.md, "Changes").
const LEGACY_LOCK: &str = "immutable";
const MARKER_SUFFIX: &str = ".deleted";

pub(crate) fn marker_name(id: &PointId) -> String {
    format!("{}{MARKER_SUFFIX}", id.to_hex())
}

/// The point a marker's object name marks, if it is one.
pub(crate) fn marked_point(name: &str) -> Option<PointId> {
    name.strip_suffix(MARKER_SUFFIX)?.parse().ok()
}

/// What a deletion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// Soft-deleted: restorable by undelete until then; removed by the first gc after it.
    Until(DateTime<Utc>),
    /// Removed at once (soft delete is off in this unlocked vault).
    Removed,
}

/// The vault's points as its rules see them, from one listing.
#[derive(Debug, Default)]
pub struct PointList {
    /// Points that are not deleted, oldest first.
    pub live: Vec<Manifest>,
    /// Soft-deleted points with their markers, oldest first.
    pub deleted: Vec<(Manifest, Deletion)>,
    /// Manifests or markers that could not be read, and why.
    pub unreadable: Vec<Unreadable>,
}

/// The points a policy's recorded rules count: those taken on a schedule. On-demand points
/// and points with no recorded end never push one out.
fn scheduled(live: &[Manifest]) -> Vec<Manifest> {
    live.iter()
        .filter(|m| matches!(m.retention, PointRetention::Policy { .. }))
        .cloned()
        .collect()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Vault {
    fn now_utc(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(self.clock.now())
    }

    /// The vault's rules: the `rules` object; a vault without one has the defaults (soft
    /// delete 14 days), and is locked if vmvault server 0.1 left its lock marker.
    pub fn rules(&self) -> Result<VaultRules> {
        let damaged = |why: String| StoreError::Damaged {
            location: self.location(),
            object: "the vault's rules".into(),
            reason: format!("{why}; nothing is deleted from this vault until it is repaired"),
        };
        match self.backend().read(Kind::Config, RULES_NAME) {
            Ok(bytes) => self
                .codec()
                .open(ObjectKind::Rules, &bytes, MAX_RULES_LEN)
                .and_then(|p| VaultRules::decode(&p))
                .map_err(|e| damaged(e.to_string())),
            Err(StoreError::Damaged { reason, .. }) => Err(damaged(reason)),
            Err(StoreError::NotFound(_)) => {
                let mut rules = VaultRules::default();
                if self.backend().stat(Kind::Config, LEGACY_LOCK)?.is_some() {
                    // Unauthenticated, but it can only ever make the vault safer.
                    rules.locked = Some(Locked {
                        at: self
                            .backend()
                            .read(Kind::Config, LEGACY_LOCK)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                            .and_then(|v| v["locked_at"].as_str().map(str::to_string))
                            .unwrap_or_else(|| ts(self.now_utc())),
                        by: "vmvault server 0.1".into(),
                        hold_days: None,
                    });
                }
                Ok(rules)
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn write_rules(&self, rules: &VaultRules) -> Result<()> {
        let sealed = self.codec().seal(ObjectKind::Rules, &rules.encode());
        self.backend().write(Kind::Config, RULES_NAME, &sealed)?;
        self.backend().sync()
    }

    /// Sets how long deleted points stay restorable (0: deletions are immediate). A locked
    /// vault's window can only grow.
    pub fn set_soft_delete_days(&self, days: u32) -> Result<VaultRules> {
        if days > MAX_SOFT_DELETE_DAYS {
            return Err(StoreError::Invalid(format!(
                "soft delete of {days} days: give 0 (off) to {MAX_SOFT_DELETE_DAYS}"
            )));
        }
        let mut rules = self.rules()?;
        if let Some(l) = &rules.locked {
            if days < rules.soft_delete_days {
                return Err(StoreError::Refused(format!(
                    "the vault is locked (immutable since {}): its soft delete can be made \
                     longer, not shorter than {} days",
                    l.at, rules.soft_delete_days
                )));
            }
        }
        rules.soft_delete_days = days;
        self.write_rules(&rules)?;
        Ok(rules)
    }

    /// Locks the vault for good, asking the storage to hold each object for the default
    /// [`vmvault_format::DEFAULT_HOLD_DAYS`] (see [`Vault::lock_vault_holding`]).
    pub fn lock_vault(&self, by: &str) -> Result<VaultRules> {
        self.lock_vault_holding(by, vmvault_format::DEFAULT_HOLD_DAYS)
    }

    /// Locks the vault for good. Soft delete is turned on (14 days) if it was off. The rules
    /// ask each region's storage to hold every object written for `hold_days` days where it
    /// can (see `hold`); the caller renews the holds of what is already there
    /// ([`Vault::renew_holds`]). Locking a locked vault can lengthen its hold (or give one to a
    /// vault locked before holds existed), never shorten it; it changes nothing else.
    pub fn lock_vault_holding(&self, by: &str, hold_days: u32) -> Result<VaultRules> {
        if !(1..=MAX_HOLD_DAYS).contains(&hold_days) {
            return Err(StoreError::Invalid(format!(
                "a storage hold of {hold_days} days: give 1 to {MAX_HOLD_DAYS}"
            )));
        }
        let mut rules = self.rules()?;
        let changed = match &mut rules.locked {
            Some(l) => {
                let longer = l.hold_days.is_none_or(|d| d < hold_days);
                if longer {
                    l.hold_days = Some(hold_days);
                }
                longer
            }
            None => {
                if rules.soft_delete_days == 0 {
                    rules.soft_delete_days = vmvault_format::DEFAULT_SOFT_DELETE_DAYS;
                }
                rules.locked = Some(Locked {
                    at: ts(self.now_utc()),
                    by: by.into(),
                    hold_days: Some(hold_days),
                });
                true
            }
        };
        if changed {
            self.write_rules(&rules)?;
        }
        self.apply_hold()?;
        Ok(rules)
    }

    /// Every point as the rules see it: live, soft-deleted, unreadable. One listing.
    pub fn list_points(&self) -> Result<PointList> {
        let mut ids = Vec::new();
        let mut marked = HashSet::new();
        for o in self.backend().list(Kind::Point)? {
            if let Ok(id) = o.name.parse::<PointId>() {
                ids.push(id);
            } else if let Some(id) = marked_point(&o.name) {
                marked.insert(id);
            }
        }
        let mut out = PointList::default();
        for id in ids {
            let m = match self.load_manifest(&id) {
                Ok(m) => m,
                // Removed by a prune or gc since the listing: not a point any more.
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => {
                    out.unreadable.push((id, e));
                    continue;
                }
            };
            if !marked.contains(&id) {
                out.live.push(m);
                continue;
            }
            match self.deletion(&id) {
                Ok(Some(d)) => out.deleted.push((m, d)),
                Ok(None) => out.live.push(m),
                // Neither listed as live nor silently restored to view: damage to look at.
                Err(e) => out.unreadable.push((id, e)),
            }
        }
        let order = |a: &Manifest, b: &Manifest| a.time.cmp(&b.time).then(a.id.cmp(&b.id));
        out.live.sort_by(order);
        out.deleted.sort_by(|a, b| order(&a.0, &b.0));
        Ok(out)
    }

    /// The marker of point `id`, if it is soft-deleted.
    pub fn deletion(&self, id: &PointId) -> Result<Option<Deletion>> {
        let bytes = match self.backend().read(Kind::Point, &marker_name(id)) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.codec()
            .open(ObjectKind::Deletion, &bytes, MAX_RULES_LEN)
            .and_then(|p| Deletion::decode(&p, id))
            .map(Some)
            .map_err(|e| StoreError::Damaged {
                location: self.location(),
                object: format!("the deletion marker of recovery point {id}"),
                reason: e.to_string(),
            })
    }

    /// Why the vault's rules refuse to delete point `id` now, if they do: what
    /// [`Vault::delete_point`] would say, without deleting.
    pub fn deletion_refused(&self, id: &PointId) -> Result<Option<String>> {
        self.refusal(&self.rules()?, &self.list_points()?, id)
    }

    fn refusal(
        &self,
        rules: &VaultRules,
        list: &PointList,
        id: &PointId,
    ) -> Result<Option<String>> {
        let Some(point) = list.live.iter().find(|m| m.id == *id) else {
            if list.deleted.iter().any(|(m, _)| m.id == *id) {
                return Err(StoreError::Invalid(format!(
                    "recovery point {} is deleted already",
                    id.short()
                )));
            }
            return Err(StoreError::NotFound(format!("recovery point {id}")));
        };
        let Some(l) = &rules.locked else {
            return Ok(None);
        };
        Ok(
            retention::in_force(point, &scheduled(&list.live), self.now_utc()).map(|why| {
                format!(
                    "the vault is locked (immutable since {}): recovery point {}@{} cannot be \
                     deleted: {why}",
                    l.at,
                    point.vm,
                    id.short()
                )
            }),
        )
    }

    /// Deletes recovery point `id` as the vault's rules allow, recording `by` and `reason`.
    /// Refused ([`StoreError::Refused`]) in a locked vault while the point's own retention is
    /// in force; soft unless soft delete is off.
    pub fn delete_point(&self, id: &PointId, by: &str, reason: &str) -> Result<Deleted> {
        let rules = self.rules()?;
        let list = self.list_points()?;
        if let Some(why) = self.refusal(&rules, &list, id)? {
            return Err(StoreError::Refused(why));
        }
        let now = self.now_utc();
        if rules.soft_delete_days == 0 {
            self.remove_manifest(id)?;
            self.backend().sync()?;
            return Ok(Deleted::Removed);
        }
        let marker = Deletion {
            version: DELETION_VERSION,
            point: *id,
            deleted_at: ts(now),
            by: by.into(),
            reason: reason.into(),
        };
        let sealed = self.codec().seal(ObjectKind::Deletion, &marker.encode());
        self.backend()
            .write(Kind::Point, &marker_name(id), &sealed)?;
        self.backend().sync()?;
        Ok(Deleted::Until(
            now + chrono::Duration::days(i64::from(rules.soft_delete_days)),
        ))
    }

    /// Makes a soft-deleted point live again.
    pub fn undelete_point(&self, id: &PointId) -> Result<()> {
        if self
            .backend()
            .stat(Kind::Point, &marker_name(id))?
            .is_none()
        {
            return Err(StoreError::Invalid(format!(
                "recovery point {} is not deleted",
                id.short()
            )));
        }
        self.backend().remove(Kind::Point, &marker_name(id))?;
        self.backend().sync()
    }

    /// Removes for good the points whose soft-delete window is over, and markers left without
    /// their point. The window counts from the marker's own time and from the storage's time
    /// of writing it, and must be over by this host's clock and by `storage_now` (the storage's
    /// time now, as a collection read it from its lock): a host whose clock runs ahead does not
    /// purge early. Called by garbage collection under its lock. Returns the purged points.
    pub fn purge_expired(&self, storage_now: Option<SystemTime>) -> Result<Vec<PointId>> {
        let rules = self.rules()?;
        let window = Duration::from_secs(u64::from(rules.soft_delete_days) * 86_400);
        let objects = self.backend().list(Kind::Point)?;
        let present: HashSet<PointId> =
            objects.iter().filter_map(|o| o.name.parse().ok()).collect();
        let written: HashMap<PointId, SystemTime> = objects
            .iter()
            .filter_map(|o| marked_point(&o.name).map(|id| (id, o.modified)))
            .collect();
        let now = self.clock.now();
        let mut purged = Vec::new();
        let mut list: Option<PointList> = None;
        for (id, stored_at) in written {
            if !present.contains(&id) {
                let _ = self.backend().remove(Kind::Point, &marker_name(&id));
                continue;
            }
            // A marker that cannot be read keeps its point: damage is reported by listings.
            let Ok(Some(d)) = self.deletion(&id) else {
                continue;
            };
            let Ok(at) = DateTime::parse_from_rfc3339(&d.deleted_at) else {
                continue;
            };
            let by_host = SystemTime::from(at.with_timezone(&Utc)) + window <= now;
            let by_storage = storage_now.is_some_and(|s| stored_at + window <= s);
            if !(by_host && by_storage) {
                continue;
            }
            if rules.locked.is_some() {
                // Deleted while its retention had ended; asked again in case that was wrong.
                if list.is_none() {
                    list = Some(self.list_points()?);
                }
                let list = list.as_ref().expect("listed above");
                let scheduled = scheduled(&list.live);
                if let Some((m, _)) = list.deleted.iter().find(|(m, _)| m.id == id) {
                    if retention::in_force(m, &scheduled, self.now_utc()).is_some() {
                        continue;
                    }
                }
            }
            // Manifest first: a crash in between leaves a stray marker, removed next time,
            // never a visible point that was meant to be gone.
            self.remove_manifest(&id)?;
            self.backend().sync()?;
            self.backend().remove(Kind::Point, &marker_name(&id))?;
            purged.push(id);
        }
        if !purged.is_empty() {
            self.backend().sync()?;
        }
        Ok(purged)
    }
}

impl Vault {
    /// Seals what vmvault server 0.1 wrote as plain JSON (`immutable`, `deleted.ID`): the
    /// lock into the rules object, each deletion into a marker whose window starts now (its
    /// old time was not authenticated, so it can only be made later, never earlier). Returns
    /// how many it converted.
    pub fn migrate_legacy_markers(&self) -> Result<usize> {
        let mut n = 0;
        if self.backend().stat(Kind::Config, RULES_NAME)?.is_none()
            && self.backend().stat(Kind::Config, LEGACY_LOCK)?.is_some()
        {
            self.write_rules(&self.rules()?)?;
            n += 1;
        }
        for id in self.point_ids()? {
            let legacy = format!("deleted.{}", id.to_hex());
            if self.backend().stat(Kind::Config, &legacy)?.is_none() {
                continue;
            }
            if self.deletion(&id).ok().flatten().is_none() {
                let marker = Deletion {
                    version: DELETION_VERSION,
                    point: id,
                    deleted_at: ts(self.now_utc()),
                    by: "vmvault server 0.1".into(),
                    reason: "point delete (before the markers were sealed)".into(),
                };
                let sealed = self.codec().seal(ObjectKind::Deletion, &marker.encode());
                self.backend()
                    .write(Kind::Point, &marker_name(&id), &sealed)?;
            }
            self.backend().sync()?;
            match self.backend().remove(Kind::Config, &legacy) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            n += 1;
        }
        Ok(n)
    }
}
