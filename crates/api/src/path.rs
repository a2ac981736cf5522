//! Request paths and query strings, built from names the user typed.
//!
//! A name goes into a path as one segment, percent-encoded, and into a query as one
//! value, form-encoded as the server's query reader (axum's `Query`, i.e.
//! `serde_urlencoded`) decodes it. Pasted in as it is, a `/` would make a name two
//! segments (another route), a `?` or `#` would end the path, and a `%` or `+` would be
//! decoded into something else: the request would reach another resource than the one
//! named, or a different item than the one asked for.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

/// What stays as it is in a path segment: RFC 3986's unreserved characters only. Everything
/// else is encoded, including characters a path may carry literally (`@`, `:`, `+`), so that
/// no server or proxy on the way can read them as anything but part of the name.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` as one path segment.
///
/// The empty name and `.` or `..` are refused: the URL rules make a segment of only dots a
/// step within the path whether encoded or not (`%2E%2E` included), and an empty one joins
/// its neighbours, so the request would reach another resource than the one named.
pub fn segment(s: &str) -> Result<String, PathError> {
    if matches!(s, "" | "." | "..") {
        return Err(PathError::Unaddressable(s.to_string()));
    }
    Ok(utf8_percent_encode(s, SEGMENT).to_string())
}

/// A request path this crate will not build.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} cannot be named in a request path: it would address another resource")]
    Unaddressable(String),
    /// A query type with nested structures, which the API's query types do not have.
    #[error("the request's query: {0}")]
    Query(#[from] serde_urlencoded::ser::Error),
}

/// `path?query`, the query's fields as `key=value` pairs in their declared order (fields
/// that are `None` left out), or `path` alone when no field is left.
pub fn with_query<Q: Serialize>(path: &str, q: &Q) -> Result<String, PathError> {
    let query = serde_urlencoded::to_string(q)?;
    if query.is_empty() {
        Ok(path.to_string())
    } else {
        Ok(format!("{path}?{query}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobQuery, PointQuery};

    /// Characters that would change which resource a path names are encoded; the rest of a
    /// name stays readable.
    #[test]
    fn a_name_is_one_path_segment_whatever_it_holds() {
        let cases = [
            ("web01", "web01"),
            ("web-01_a.b~c", "web-01_a.b~c"),
            ("two words", "two%20words"),
            ("a/b", "a%2Fb"),
            ("../admin", "..%2Fadmin"),
            ("x?state=failed", "x%3Fstate%3Dfailed"),
            ("x#frag", "x%23frag"),
            ("100%", "100%25"),
            ("%2F", "%252F"),
            ("a+b", "a%2Bb"),
            ("ops@example.org", "ops%40example.org"),
            (
                "web01@2024-05-01T02:00:00+02:00",
                "web01%402024-05-01T02%3A00%3A00%2B02%3A00",
            ),
            ("vm\u{e9}", "vm%C3%A9"),
        ];
        for (name, want) in cases {
            assert_eq!(segment(name).unwrap(), want, "{name:?}");
        }
    }

    /// Names the URL rules would turn into another path are refused, not sent.
    #[test]
    fn dot_segments_and_the_empty_name_are_refused() {
        for name in ["", ".", ".."] {
            let e = segment(name).unwrap_err();
            assert!(
                matches!(e, PathError::Unaddressable(ref n) if n == name),
                "{e}"
            );
        }
        assert_eq!(segment("...").unwrap(), "...");
        assert_eq!(segment(".hidden").unwrap(), ".hidden");
    }

    /// What the client writes is what the server's query reader (the same
    /// `serde_urlencoded` axum's `Query` uses) reads back: the same values, none split or
    /// merged, whatever characters they hold.
    #[test]
    fn query_values_read_back_as_they_were_given() {
        for item in [
            "web01",
            "two words",
            "a&deleted=true",
            "x#y",
            "a+b",
            "100%",
            "k=v",
            "vm\u{e9}/?",
        ] {
            let q = PointQuery {
                item: Some(item.into()),
                limit: Some(1000),
                cursor: Some(format!("2024-05-01T02:00:00+02:00/{item}")),
                deleted: false,
            };
            let path = with_query("/recovery-points", &q).unwrap();
            let (p, query) = path.split_once('?').unwrap();
            assert_eq!(p, "/recovery-points");
            assert!(!query.contains('#') && !query.contains(' '), "{query}");
            let back: PointQuery = serde_urlencoded::from_str(query).unwrap();
            assert_eq!(back, q, "{query}");
        }
    }

    /// The bytes on the wire: every character that would end the value, the pair or the
    /// query, or decode into another one, is encoded.
    #[test]
    fn a_query_value_is_encoded_whole() {
        let q = PointQuery {
            item: Some("a b/c?d#e%f&g=h+i".into()),
            limit: None,
            cursor: None,
            deleted: true,
        };
        assert_eq!(
            with_query("/recovery-points", &q).unwrap(),
            "/recovery-points?item=a+b%2Fc%3Fd%23e%25f%26g%3Dh%2Bi&deleted=true"
        );
    }

    #[test]
    fn absent_fields_are_left_out_of_the_query() {
        let q = JobQuery {
            state: None,
            limit: Some(50),
            before: None,
        };
        assert_eq!(with_query("/jobs", &q).unwrap(), "/jobs?limit=50");
        let none = JobQuery {
            state: None,
            limit: None,
            before: None,
        };
        assert_eq!(with_query("/jobs", &none).unwrap(), "/jobs");
        let q = JobQuery {
            state: Some("failed".into()),
            limit: Some(1),
            before: Some(7),
        };
        assert_eq!(
            with_query("/jobs", &q).unwrap(),
            "/jobs?state=failed&limit=1&before=7"
        );
    }
}
