//! What an `object_store` failure means for the vault, and keeping secrets out of messages.

use std::error::Error as StdError;

use object_store::client::HttpError;

/// Query and header values that are secrets or lead to them, whatever credentials are known.
const SECRET_KEYS: [&str; 6] = [
    "sig=",
    "signature=",
    "credential=",
    "x-amz-security-token=",
    "awsaccesskeyid=",
    "sharedkey ",
];

/// Where a secret value ends inside a message.
fn ends_value(c: char) -> bool {
    c.is_whitespace() || matches!(c, '&' | '"' | '\'' | '<' | '>' | ',' | ')' | ';')
}

/// Removes every known secret and every signature-like value from messages.
#[derive(Clone)]
pub(crate) struct Redactor {
    /// Longest first, so that a secret containing another is removed whole.
    secrets: Vec<String>,
}

impl Redactor {
    /// Values shorter than 4 characters are not taken as secrets: hiding every "a" would make
    /// messages unreadable, and no credential is that short.
    pub fn new(secrets: Vec<String>) -> Redactor {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        redact_values(&out)
    }
}

/// Replaces the value after each of [`SECRET_KEYS`] (any case) with `<redacted>`.
fn redact_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while pos < text.len() {
        let next = SECRET_KEYS
            .iter()
            .filter_map(|k| lower[pos..].find(k).map(|i| (pos + i, k.len())))
            .min();
        let Some((start, key_len)) = next else { break };
        let value_start = start + key_len;
        let value_end = text[value_start..]
            .find(ends_value)
            .map_or(text.len(), |i| value_start + i);
        out.push_str(&text[pos..value_start]);
        if value_end > value_start {
            out.push_str("<redacted>");
        }
        pos = value_end;
    }
    out.push_str(&text[pos..]);
    out
}

/// Decodes `%XX` escapes (and leaves anything malformed as it is).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What went wrong, in the vault's terms.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The object is absent.
    Missing,
    /// The bucket or container is absent.
    NoBucket,
    /// Anything else; `detail` is already redacted.
    Other { detail: String, transient: bool },
}

/// Whether an HTTP status says the same request may succeed later (a server error, throttling,
/// a request timeout).
pub(crate) fn transient_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// Judges an `object_store` error; every text in the result has gone through `redactor`.
pub(crate) fn classify(e: &object_store::Error, redactor: &Redactor) -> Failure {
    let text = chain_text(e);
    // The error code in the body: HEAD answers have none, so a HEAD cannot tell a missing
    // bucket from a missing object.
    if matches!(
        xml_element(&text, "Code"),
        Some("NoSuchBucket" | "ContainerNotFound")
    ) {
        return Failure::NoBucket;
    }
    if let object_store::Error::NotFound { .. } = e {
        return Failure::Missing;
    }
    if let Some(status) = status_of(&text) {
        let transient = transient_status(status);
        let mut detail = format!("HTTP {status}");
        if let Some(reason) = reason_phrase(&text, status) {
            detail.push(' ');
            detail.push_str(reason);
        }
        if let Some(code) = xml_element(&text, "Code") {
            detail.push_str(": ");
            detail.push_str(code);
        }
        if let Some(message) = xml_element(&text, "Message") {
            detail.push_str(": ");
            detail.push_str(message.lines().next().unwrap_or_default());
        }
        if status == 403 || status == 401 {
            detail.push_str(" (check the credentials and the permissions)");
        }
        return Failure::Other {
            detail: redactor.redact(&detail),
            transient,
        };
    }
    if text.contains("Server returned error response") {
        // S3 can report a failure in the body of a 200 response (CompleteMultipartUpload, copy).
        let code = xml_element(&text, "Code").unwrap_or("unknown error");
        let transient = matches!(code, "InternalError" | "SlowDown" | "ServiceUnavailable");
        return Failure::Other {
            detail: redactor.redact(&format!("server error: {code}")),
            transient,
        };
    }
    // No HTTP status: the request never got an answer (refused, reset, timed out).
    let transient = http_error(e).is_some();
    Failure::Other {
        detail: truncate(redactor.redact(&text), 600),
        transient,
    }
}

fn http_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a HttpError> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h);
        }
        current = err.source();
    }
    None
}

/// The error and its sources, joined with ": ", repeats left out.
fn chain_text(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        let s = err.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        current = err.source();
    }
    text
}

/// The HTTP status of a response `object_store` reported ("... status code: 403 Forbidden").
fn status_of(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().filter(|s| (100..600).contains(s))
}

fn reason_phrase(text: &str, status: u16) -> Option<&str> {
    let marker = format!("status code: {status} ");
    let at = text.find(&marker)? + marker.len();
    let rest = &text[at..];
    let end = rest.find(':').unwrap_or(rest.len());
    let phrase = rest[..end].trim();
    (!phrase.is_empty() && phrase.len() < 40).then_some(phrase)
}

/// The text of the first `<NAME>...</NAME>` element, if short and plain.
pub(crate) fn xml_element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&close)?;
    let value = text[start..start + len].trim();
    (!value.is_empty() && value.len() <= 400).then_some(value)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_signatures_are_redacted() {
        let r = Redactor::new(vec!["s3cr3t/Key+x".into(), "ab".into()]);
        let text = "PUT http://h/b?sig=abc%2Fdef&se=2030 key s3cr3t/Key+x, \
                    X-Amz-Credential=AKIA/2024/us-east-1/s3/aws4_request&X-Amz-Signature=ff00 \
                    Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=0123 \
                    SharedKey acct:c2lnbmF0dXJl ab";
        let out = r.redact(text);
        for gone in ["abc", "s3cr3t", "AKIA", "ff00", "0123", "c2lnbmF0dXJl"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.contains("se=2030") && out.ends_with(" ab"), "{out}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Bb%2f%zz%"), "a+b/%zz%");
    }

    #[test]
    fn status_and_xml() {
        let text = "Error performing PUT http://x in 1ms - Server returned non-2xx status code: \
                    503 Service Unavailable: <Error><Code>SlowDown</Code><Message>Reduce\nrate</Message></Error>";
        assert_eq!(status_of(text), Some(503));
        assert_eq!(reason_phrase(text, 503), Some("Service Unavailable"));
        assert_eq!(xml_element(text, "Code"), Some("SlowDown"));
        assert_eq!(status_of("no status here"), None);
    }
}
