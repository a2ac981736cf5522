//! The per-VM pre/post scripts file (TOML): what runs inside the guest, through the guest
//! agent's `guest-exec`, around the file-system freeze of a backup.
//!
//! ```toml
//! continue_on_failure = false   # a failed script fails the backup job (else: lower consistency)
//! skip_freeze = false           # the scripts quiesce the application; don't fsfreeze
//! [pre]
//! path = "/usr/local/sbin/db-quiesce"
//! args = ["--database", "orders"]
//! timeout_secs = 30
//! retries = 1
//! [post]
//! path = "/usr/local/sbin/db-resume"
//! args = []
//! timeout_secs = 30
//! ```
//! Unknown keys are errors (a misspelt `continue_on_faliure` must not silently mean `false`).
//! The file is read on the host; the scripts themselves live in the guest.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest a script may be given: a backup must not wait on a guest for hours.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// Retries beyond this are a mistake in the file, not a policy.
pub const MAX_RETRIES: u32 = 10;

/// What is wrong with a scripts file.
#[derive(Debug, Error)]
pub enum ScriptsError {
    #[error("reading the scripts file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the scripts file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// The scripts of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scripts {
    /// When a script fails or times out: `true` takes the point anyway at a lower consistency
    /// level (with the reason), `false` fails the backup job.
    #[serde(default)]
    pub continue_on_failure: bool,
    /// The pre-script quiesces the application itself: no file-system freeze.
    #[serde(default)]
    pub skip_freeze: bool,
    /// Runs before the freeze.
    #[serde(default)]
    pub pre: Option<Script>,
    /// Runs after the thaw (also after a pre-script that failed, to undo what it did).
    #[serde(default)]
    pub post: Option<Script>,
}

/// One script in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The program's path in the guest (an executable, e.g. a shell script with `#!`).
    pub path: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// How long one run may take; it is killed then and counts as failed.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// How many more times a failed run is tried.
    #[serde(default)]
    pub retries: u32,
}

fn default_timeout_secs() -> u64 {
    30
}

impl Script {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl Scripts {
    /// Reads and checks a scripts file.
    pub fn load(path: &Path) -> Result<Scripts, ScriptsError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScriptsError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::parse(&text).map_err(|message| ScriptsError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and checks a scripts file's text; the error says what and where.
    pub fn parse(text: &str) -> Result<Scripts, String> {
        let scripts: Scripts = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, script) in [("pre", &scripts.pre), ("post", &scripts.post)] {
            if let Some(s) = script {
                s.check().map_err(|m| format!("[{name}]: {m}"))?;
            }
        }
        if scripts.skip_freeze && scripts.pre.is_none() {
            return Err(
                "skip_freeze = true needs a [pre] script: without a freeze, it is what \
                 quiesces the guest"
                    .into(),
            );
        }
        Ok(scripts)
    }
}

impl Script {
    fn check(&self) -> Result<(), String> {
        if self.path.trim().is_empty() {
            return Err("path is empty".into());
        }
        if self.path.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err("path and args cannot hold NUL characters".into());
        }
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            return Err(format!(
                "timeout_secs must be 1 to {MAX_TIMEOUT_SECS}, not {}",
                self.timeout_secs
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(format!(
                "retries must be at most {MAX_RETRIES}, not {}",
                self.retries
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
continue_on_failure = false
skip_freeze = false
[pre]
path = "/usr/local/sbin/db-quiesce"
args = ["--database", "orders"]
timeout_secs = 30
retries = 1
[post]
path = "/usr/local/sbin/db-resume"
args = []
timeout_secs = 30
"#;

    #[test]
    fn the_documented_example_parses() {
        let s = Scripts::parse(EXAMPLE).unwrap();
        assert!(!s.continue_on_failure && !s.skip_freeze);
        let pre = s.pre.unwrap();
        assert_eq!(pre.path, "/usr/local/sbin/db-quiesce");
        assert_eq!(pre.args, ["--database", "orders"]);
        assert_eq!(pre.timeout(), Duration::from_secs(30));
        assert_eq!(pre.retries, 1);
        assert_eq!(s.post.unwrap().retries, 0);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let s = Scripts::parse("[pre]\npath = \"/bin/true\"\n").unwrap();
        assert!(!s.continue_on_failure && !s.skip_freeze && s.post.is_none());
        let pre = s.pre.unwrap();
        assert_eq!((pre.timeout_secs, pre.retries), (30, 0));
        assert!(pre.args.is_empty());
        assert_eq!(Scripts::parse("").unwrap(), Scripts::default());
    }

    #[test]
    fn unknown_keys_are_errors_that_name_them() {
        let e = Scripts::parse("continue_on_faliure = true\n").unwrap_err();
        assert!(e.contains("continue_on_faliure"), "{e}");
        let e = Scripts::parse("[pre]\npath = \"/x\"\ntimeout = 5\n").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let e = Scripts::parse("[during]\npath = \"/x\"\n").unwrap_err();
        assert!(e.contains("during"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        let bad = [
            ("[pre]\nargs = []\n", "path"),
            ("[pre]\npath = \" \"\n", "path is empty"),
            ("[pre]\npath = \"/x\"\ntimeout_secs = 0\n", "timeout_secs"),
            (
                "[post]\npath = \"/x\"\ntimeout_secs = 99999\n",
                "timeout_secs",
            ),
            ("[pre]\npath = \"/x\"\nretries = -1\n", "retries"),
            ("[pre]\npath = \"/x\"\nretries = 11\n", "retries"),
            ("continue_on_failure = \"yes\"\n", "continue_on_failure"),
            ("skip_freeze = true\n", "skip_freeze"),
            ("[pre\npath = 1", "line"),
        ];
        for (text, want) in bad {
            let e = Scripts::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm1-scripts.toml");
        let e = Scripts::load(&p).unwrap_err().to_string();
        assert!(e.contains("vm1-scripts.toml"), "{e}");
        std::fs::write(&p, "skip_freeze = 1\n").unwrap();
        let e = Scripts::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("vm1-scripts.toml") && e.contains("skip_freeze"),
            "{e}"
        );
        std::fs::write(&p, EXAMPLE).unwrap();
        assert!(Scripts::load(&p).unwrap().pre.is_some());
    }

    #[test]
    fn scripts_survive_the_trip_to_the_helper_process() {
        let s = Scripts::parse(EXAMPLE).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Scripts>(&json).unwrap(), s);
    }
}
