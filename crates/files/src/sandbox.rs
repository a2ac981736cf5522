//! Least privilege while guest filesystems are parsed: the calling thread (and every thread or
//! process it starts later) loses the right to write anywhere but the output folder, through
//! Linux Landlock. Reads stay open: the vault itself is read. A kernel without Landlock
//! leaves the thread as it was, and [`confine`] says so.

use std::path::Path;

use landlock::{
    path_beneath_rules, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

/// How far the confinement went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confinement {
    /// Every write right outside the output folder is gone.
    Full,
    /// The kernel knows some of the rights only.
    Partial,
    /// No Landlock here: nothing changed.
    None,
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Confinement::Full => "no write outside the output folder (Landlock)",
            Confinement::Partial => "partly (this kernel's Landlock knows some rights only)",
            Confinement::None => "not confined (no Landlock on this kernel)",
        })
    }
}

/// Takes every filesystem write right from this thread, except beneath `out` (which must
/// exist). Call it after the vault is open and before any guest byte is parsed.
pub fn confine(out: Option<&Path>) -> std::io::Result<Confinement> {
    let err = |e: landlock::RulesetError| std::io::Error::other(e.to_string());
    let abi = ABI::V3;
    let write = AccessFs::from_write(abi);
    let mut ruleset = Ruleset::default()
        .handle_access(write)
        .map_err(err)?
        .create()
        .map_err(err)?;
    if let Some(dir) = out {
        ruleset = ruleset
            .add_rules(path_beneath_rules([dir], write))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confinement::Full,
        RulesetStatus::PartiallyEnforced => Confinement::Partial,
        RulesetStatus::NotEnforced => Confinement::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_thread_writes_only_beneath_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (outside, inside) = (dir.path().join("outside.txt"), out.join("inside.txt"));
        let (o, i) = (outside.clone(), inside.clone());
        let level = std::thread::spawn(move || {
            let level = confine(Some(&out)).unwrap();
            let wrote_outside = std::fs::write(&o, b"x").is_ok();
            std::fs::write(&i, b"x").unwrap();
            (level, wrote_outside)
        })
        .join()
        .unwrap();
        match level {
            (Confinement::None, _) => eprintln!("skipped: no Landlock in this kernel"),
            (_, wrote_outside) => assert!(!wrote_outside, "wrote outside its output"),
        }
        assert!(inside.exists());
        // Other threads keep their rights.
        std::fs::write(&outside, b"y").unwrap();
    }
}
