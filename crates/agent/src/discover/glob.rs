//! Just enough globbing for socket paths: `*` and `?` in any segment, as a shell has them
//! (neither crosses a `/`, and neither matches a leading `.`).

use std::path::{Component, Path, PathBuf};

/// The existing paths `pattern` matches, sorted. A folder that cannot be read matches
/// nothing: the default glob's folder is absent on hosts that keep their sockets elsewhere.
pub fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for c in Path::new(pattern).components() {
        let seg = match c {
            Component::Normal(s) => s,
            // Root, `.` and `..` have no wildcards: kept as they are.
            other => {
                for p in &mut found {
                    p.push(other);
                }
                continue;
            }
        };
        let Some(seg) = seg.to_str().filter(|s| s.contains(['*', '?'])) else {
            for p in &mut found {
                p.push(seg);
            }
            continue;
        };
        let mut next = Vec::new();
        for dir in &found {
            let listing = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir.as_path()
            };
            let Ok(entries) = std::fs::read_dir(listing) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                if matches(seg, &name.to_string_lossy()) {
                    next.push(dir.join(&name));
                }
            }
        }
        found = next;
    }
    let mut out: Vec<PathBuf> = found
        .into_iter()
        .filter(|p| !p.as_os_str().is_empty() && p.symlink_metadata().is_ok())
        .collect();
    out.sort();
    out
}

/// Whether `name` matches the one-segment pattern `pat`.
pub fn matches(pat: &str, name: &str) -> bool {
    if name.starts_with('.') && !pat.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was, and how much of the name it had taken: on a mismatch it takes
    // one character more. One star remembered is enough (linear backtracking, no blow-up).
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_and_question_marks_match_as_in_a_shell() {
        assert!(matches("*.sock", "web01.sock"));
        assert!(!matches("*.sock", ".sock"));
        assert!(matches(".*", ".hidden"));
        assert!(matches("qmp-?.sock", "qmp-1.sock"));
        assert!(!matches("qmp-?.sock", "qmp-12.sock"));
        assert!(matches("*", "x"));
        assert!(matches("a*b*c", "aXXbYYbc"));
        assert!(!matches("a*b*c", "aXXbYYbd"));
        assert!(matches("**", ""));
        assert!(!matches("?", ""));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(!matches(&"*a".repeat(30), &"a".repeat(29)));
    }

    #[test]
    fn every_segment_may_have_wildcards() {
        let t = tempfile::tempdir().unwrap();
        for d in ["vm1", "vm2", "other", ".hidden"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
            std::fs::write(t.path().join(d).join("qmp.sock"), b"").unwrap();
        }
        std::fs::write(t.path().join("vm1/qga.sock"), b"").unwrap();
        let base = t.path().display();
        let got = expand(&format!("{base}/vm?/*.sock"));
        let want: Vec<PathBuf> = ["vm1/qga.sock", "vm1/qmp.sock", "vm2/qmp.sock"]
            .iter()
            .map(|p| t.path().join(p))
            .collect();
        assert_eq!(got, want);
        assert_eq!(expand(&format!("{base}/*/qmp.sock")).len(), 3);
        assert_eq!(
            expand(&format!("{base}/vm1/qmp.sock")),
            [t.path().join("vm1/qmp.sock")]
        );
        assert!(expand(&format!("{base}/nowhere/*.sock")).is_empty());
        assert!(expand(&format!("{base}/vm1/none.sock")).is_empty());
        assert!(expand("").is_empty());
    }
}
