//! Walking a folder tree, bounded: a guest filesystem may be built so that its folders loop
//! (a folder listed inside itself), go arbitrarily deep, or hold absurd numbers of entries.
//! And glob patterns for `find`.

use std::collections::HashSet;

use crate::error::{FilesError, Result};
use crate::fs::{Entry, Filesystem, Kind, Opener};

/// Folders deeper than this below the walk's start are not entered.
pub const MAX_DEPTH: usize = 128;
/// A walk lists at most this many entries (fewer on a smaller filesystem: see
/// [`crate::fs::entry_limit`]).
pub const MAX_ENTRIES: u64 = 5_000_000;

/// What the visitor wants after seeing a folder.
#[derive(Debug, PartialEq, Eq)]
pub enum Visit {
    Enter,
    Skip,
}

/// Something a walk met and left out, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

pub trait Visitor {
    /// Called for every entry, `rel` being its path from the walk's start (its last component
    /// is the entry's name), with a way to open a regular file's content found while listing
    /// (`None` for the walk's start). For a folder, says whether to enter it.
    fn entry(&mut self, rel: &[String], e: &Entry, content: Option<&dyn Opener>) -> Result<Visit>;
    /// Called after a folder's entries.
    fn leave(&mut self, _rel: &[String], _e: &Entry) -> Result<()> {
        Ok(())
    }
}

pub struct Walk<'a> {
    fs: &'a dyn Filesystem,
    visited: HashSet<u64>,
    /// Entries listed so far, and the most the filesystem can hold.
    count: u64,
    limit: u64,
    pub skipped: Vec<Skipped>,
}

impl<'a> Walk<'a> {
    pub fn new(fs: &'a dyn Filesystem) -> Walk<'a> {
        Walk {
            fs,
            visited: HashSet::new(),
            count: 0,
            limit: (fs.max_entries() as u64).min(MAX_ENTRIES),
            skipped: Vec::new(),
        }
    }

    /// Walks the tree under `base` (components in the filesystem), starting with its entry
    /// `top` under the name `rel[0]`.
    pub fn run(
        &mut self,
        base: &[String],
        top: &Entry,
        rel: &mut Vec<String>,
        v: &mut dyn Visitor,
    ) -> Result<()> {
        self.visit(base, top, rel, v, None)
    }

    fn visit(
        &mut self,
        base: &[String],
        top: &Entry,
        rel: &mut Vec<String>,
        v: &mut dyn Visitor,
        content: Option<&dyn Opener>,
    ) -> Result<()> {
        if v.entry(rel, top, content)? == Visit::Skip || top.kind != Kind::Dir {
            return Ok(());
        }
        let here = || format!("/{}", base.join("/"));
        if rel.len() > MAX_DEPTH {
            self.skipped.push(Skipped {
                path: here(),
                reason: format!("deeper than {MAX_DEPTH} folders"),
            });
            return Ok(());
        }
        if let Some(id) = top.id {
            if !self.visited.insert(id) {
                self.skipped.push(Skipped {
                    path: here(),
                    reason: "a folder met twice (its filesystem loops)".into(),
                });
                return Ok(());
            }
        }
        // The visitor's own errors stop the walk; the folder's damage only skips the folder.
        let mut stopped = None;
        let fs = self.fs;
        let mut child_base = base.to_vec();
        let mut each = |e: &Entry, open: &dyn Opener| {
            self.count += 1;
            if self.count > self.limit {
                stopped = Some(FilesError::Limit(format!(
                    "more than {} entries: more than this filesystem can hold (its folders loop)",
                    self.limit
                )));
            } else {
                child_base.push(e.name.clone());
                rel.push(e.name.clone());
                if let Err(err) = self.visit(&child_base, e, rel, v, Some(open)) {
                    stopped = Some(err);
                }
                rel.pop();
                child_base.pop();
            }
            match stopped {
                Some(_) => Err(FilesError::Limit("stopped".into())),
                None => Ok(()),
            }
        };
        // A folder reached through a listing is listed from it (no lookup by path).
        let listed = match content {
            Some(folder) => folder.list_with(&mut each),
            None => fs.list_with(base, &mut each),
        };
        if let Some(err) = stopped {
            return Err(err);
        }
        match listed {
            Ok(()) => {}
            Err(e) if e.is_guest_damage() => self.skipped.push(Skipped {
                path: here(),
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
        v.leave(rel, top)
    }
}

/// A glob pattern: `*` (any run of characters but `/`), `**` (any run, `/` included), `?`,
/// `[abc]`, `[a-z]`, `[!abc]`. A pattern without `/` matches names; with one, whole paths.
pub struct Glob {
    pattern: Vec<char>,
    pub whole_path: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob> {
        if pattern.is_empty() || pattern.len() > 1024 {
            return Err(FilesError::BadPath(
                "a pattern has 1 to 1024 characters".into(),
            ));
        }
        Ok(Glob {
            pattern: pattern.chars().collect(),
            whole_path: pattern.contains('/'),
        })
    }

    pub fn matches(&self, text: &str) -> bool {
        let t: Vec<char> = text.chars().collect();
        let p = &self.pattern;
        // ok[j]: the pattern's first i characters match the text's first j.
        let mut ok = vec![false; t.len() + 1];
        ok[0] = true;
        let mut i = 0;
        while i < p.len() {
            let mut next = vec![false; t.len() + 1];
            let step = match p[i] {
                '*' => {
                    let double = p.get(i + 1) == Some(&'*');
                    let mut reach = false;
                    for j in 0..=t.len() {
                        if ok[j] {
                            reach = true;
                        } else if j > 0 && (double || t[j - 1] != '/') {
                            // still reachable through the run
                        } else {
                            reach = false;
                        }
                        next[j] = reach || ok[j];
                    }
                    if double {
                        2
                    } else {
                        1
                    }
                }
                '[' => match class(p, i) {
                    Some((set, negate, end)) => {
                        for j in 1..=t.len() {
                            let c = t[j - 1];
                            let hit = set.iter().any(|&(a, b)| a <= c && c <= b);
                            next[j] = ok[j - 1] && c != '/' && hit != negate;
                        }
                        end + 1 - i
                    }
                    None => {
                        for j in 1..=t.len() {
                            next[j] = ok[j - 1] && t[j - 1] == '[';
                        }
                        1
                    }
                },
                c => {
                    for j in 1..=t.len() {
                        next[j] = ok[j - 1] && (t[j - 1] == c || (c == '?' && t[j - 1] != '/'));
                    }
                    1
                }
            };
            ok = next;
            i += step;
        }
        ok[t.len()]
    }
}

/// A character class: its ranges, whether negated, and where its `]` is.
type Class = (Vec<(char, char)>, bool, usize);

/// The character class starting at `p[i] == '['`.
fn class(p: &[char], i: usize) -> Option<Class> {
    let mut j = i + 1;
    let negate = matches!(p.get(j), Some('!') | Some('^'));
    if negate {
        j += 1;
    }
    let mut set = Vec::new();
    let start = j;
    while j < p.len() {
        if p[j] == ']' && j > start {
            return Some((set, negate, j));
        }
        if p.get(j + 1) == Some(&'-') && p.get(j + 2).is_some_and(|&c| c != ']') {
            set.push((p[j], p[j + 2]));
            j += 3;
        } else {
            set.push((p[j], p[j]));
            j += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::Glob;

    fn m(p: &str, t: &str) -> bool {
        Glob::new(p).unwrap().matches(t)
    }

    #[test]
    fn globs() {
        assert!(m("*.sql", "dump.sql"));
        assert!(!m("*.sql", "dump.sql.gz"));
        assert!(m("*", ""));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "a/c"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("/p2/*/x.log", "/p2/var/x.log"));
        assert!(!m("/p2/*/x.log", "/p2/var/log/x.log"));
        assert!(m("/p2/**/x.log", "/p2/var/log/x.log"));
        assert!(m("**.log", "a/b/c.log"));
        assert!(m("*é*", "café"));
        assert!(m("[", "["));
        assert!(!m("*.sql", "x/y.sql"));
    }
}
