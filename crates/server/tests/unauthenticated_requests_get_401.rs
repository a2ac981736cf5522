//! Every route checks the token before anything else: a request without a valid token gets
//! 401 whatever its body (bad JSON, the wrong content type, a VM description that is not
//! TOML), so that no parser sees a byte from someone unknown. Only the OpenAPI document and
//! /metrics are open.

mod common;

use std::sync::Arc;

use common::Server;
use vmvault_server::SystemClock;

/// Fills `{name}`-style path parameters with something plausible.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                match seg {
                    "{id}" => "1",
                    _ => "default",
                }
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// (content type, body) pairs a parser would refuse with 400, 415 or 422.
const BODIES: &[(Option<&str>, &str)] = &[
    (None, ""),
    (Some("application/json"), "{not json"),
    (Some("application/json"), "{\"name\": 5, \"role\": []}"),
    (Some("text/plain"), "hello"),
    (
        Some("application/json"),
        "{\"description\": \"name = [[[ not toml\", \"policy\": \"p\"}",
    ),
    (Some("application/json"), "[]"),
];

fn send(
    s: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    ctype: Option<&str>,
    body: &str,
) -> u16 {
    let mut r = ureq::request(method, &format!("{}{path}", s.base));
    if let Some(t) = token {
        r = r.set("Authorization", t);
    }
    if let Some(c) = ctype {
        r = r.set("Content-Type", c);
    }
    let res = if body.is_empty() && ctype.is_none() {
        r.call()
    } else {
        r.send_string(body)
    };
    match res {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

#[test]
fn every_route_answers_401_before_it_reads_the_body() {
    let s = Server::start(Arc::new(SystemClock));
    let doc = s.call(None, "GET", "/api/v1/openapi.json", None);
    assert_eq!(doc.status, 200, "the OpenAPI document stays open");
    let paths = doc.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{}", paths.len());
    let mut checked = 0;
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            let path = concrete(path);
            for token in [
                None,
                Some("Bearer vmv_000000000000_nope"),
                Some("Basic YWRtaW46YWRtaW4="),
                Some("Bearer "),
            ] {
                for (ctype, body) in BODIES {
                    let status = send(&s, &method, &path, token, *ctype, body);
                    assert_eq!(
                        status, 401,
                        "{method} {path} token {token:?} body {ctype:?} {body:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 300, "{checked}");
    // A path the API does not have, or a method a path does not: 401 too, so an unknown
    // client learns nothing of the API's shape.
    for (method, path) in [
        ("GET", "/api/v1/nothing-here"),
        ("PATCH", "/api/v1/jobs"),
        ("DELETE", "/"),
    ] {
        assert_eq!(
            send(&s, method, path, None, None, ""),
            401,
            "{method} {path}"
        );
    }
    // With a valid token, the same bad bodies are the caller's mistake again (not 401).
    let admin = format!("Bearer {}", s.admin);
    let status = send(
        &s,
        "POST",
        "/api/v1/policies",
        Some(&admin),
        Some("application/json"),
        "{not json",
    );
    assert_eq!(status, 400);
    // /metrics keeps answering without a token.
    let m = s.call(None, "GET", "/metrics", None);
    assert_eq!(m.status, 200);
}

#[test]
fn refused_requests_are_audited() {
    let s = Server::start(Arc::new(SystemClock));
    let status = send(
        &s,
        "POST",
        "/api/v1/protected-items",
        None,
        Some("application/json"),
        "{\"description\": \"[[[\", \"policy\": \"p\"}",
    );
    assert_eq!(status, 401);
    let audit = s.admin("GET", "/api/v1/audit", None).body;
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["user"] == "-"
            && e["outcome"]
                .as_str()
                .unwrap()
                .starts_with("denied: no API token")),
        "{audit}"
    );
}
