//! Holding objects with S3 Object Lock (see the store's `hold` module for why): a write that
//! carries a compliance-mode retention, and a retention renewed on an object already there.
//!
//! object_store sends neither the Object Lock headers nor the Content-MD5 that S3 takes them
//! only with, so these requests are made here: signed by object_store's own SigV4 signer and
//! sent through its HTTP client, on the backend's runtime. Compliance mode, not governance:
//! no permission, not even the bucket owner's, lifts it early.
//!
//! A hold's end is reckoned from the later of the host's clock and the storage's own (the
//! `Date` of its last answer, moved on by the time since on the host's monotonic clock): a host
//! whose clock is behind would otherwise set holds that end early, or, behind by more than the
//! hold, already in the past, which holds nothing at all.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use md5::{Digest, Md5};
use object_store::aws::AwsAuthorizer;
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use vmvault_store::{Hold, StoreError};

use crate::error::{transient_status, xml_element, Failure};
use crate::object_lock::Bucket;

/// Characters a key keeps in a request path (RFC 3986 unreserved, and `/` between segments),
/// as SigV4's canonical path has them.
const KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// S3 requests object_store does not make, for one bucket.
pub(crate) struct S3Requests {
    bucket: Bucket,
    client: HttpClient,
    /// The storage's time in its last answer, and when (on this host's monotonic clock).
    storage_time: Mutex<Option<(SystemTime, Instant)>>,
}

/// `2027-01-03T12:00:00Z`: what S3 takes as a retain-until date.
fn date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

impl S3Requests {
    pub fn new(bucket: Bucket) -> Result<S3Requests, StoreError> {
        let client = ReqwestConnector::default()
            .connect(&crate::config::client_options(bucket.allow_http))
            .map_err(|e| StoreError::Invalid(format!("S3 requests: {e}")))?;
        Ok(S3Requests {
            bucket,
            client,
            storage_time: Mutex::new(None),
        })
    }

    /// The end of `hold` if it starts now, by the later of the host's and the storage's clocks.
    fn until(&self, hold: &Hold) -> SystemTime {
        let by_host = hold.until();
        let seen = *self.storage_time.lock().unwrap_or_else(|e| e.into_inner());
        match seen {
            Some((date, at)) => {
                let length = Duration::from_secs(u64::from(hold.days) * 86_400);
                by_host.max(date + at.elapsed() + length)
            }
            None => by_host,
        }
    }

    fn saw_date(&self, header: Option<&http::HeaderValue>) {
        let Some(date) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| chrono::DateTime::parse_from_rfc2822(h).ok())
        else {
            return;
        };
        *self.storage_time.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((SystemTime::from(date), Instant::now()));
    }

    /// The signed request; the status and the body of the answer.
    async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<(u16, String), Failure> {
        let transport = |e: String| Failure::Other {
            detail: e,
            transient: true,
        };
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.bucket.base));
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let mut request =
            builder
                .body(HttpRequestBody::from(body))
                .map_err(|e| Failure::Other {
                    detail: e.to_string(),
                    transient: false,
                })?;
        AwsAuthorizer::new(&self.bucket.credential, "s3", &self.bucket.region)
            .try_authorize(&mut request, None)
            .map_err(|e| Failure::Other {
                detail: e.to_string(),
                transient: false,
            })?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = response.status().as_u16();
        self.saw_date(response.headers().get(http::header::DATE));
        let text = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| transport(e.to_string()))?;
        Ok((status, String::from_utf8_lossy(&text).into_owned()))
    }

    /// The bucket's `?object-lock` configuration: the status and the body.
    pub async fn object_lock(&self) -> Result<(u16, String), Failure> {
        self.send(http::Method::GET, "/?object-lock", &[], Vec::new())
            .await
    }

    /// Writes `key` held from now for the hold's days.
    pub async fn put_held(&self, key: &str, data: &[u8], hold: &Hold) -> Result<(), Failure> {
        let headers = [
            ("content-md5", content_md5(data)),
            ("x-amz-object-lock-mode", "COMPLIANCE".to_string()),
            (
                "x-amz-object-lock-retain-until-date",
                date(self.until(hold)),
            ),
        ];
        let path = format!("/{}", utf8_percent_encode(key, KEY));
        let answer = self
            .send(http::Method::PUT, &path, &headers, data.to_vec())
            .await?;
        judge(answer)
    }

    /// Holds the current version of `key` from now for the hold's days (a compliance hold can
    /// be lengthened, never shortened).
    pub async fn extend(&self, key: &str, hold: &Hold) -> Result<(), Failure> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            date(self.until(hold))
        )
        .into_bytes();
        let headers = [("content-md5", content_md5(&body))];
        let path = format!("/{}?retention", utf8_percent_encode(key, KEY));
        judge(self.send(http::Method::PUT, &path, &headers, body).await?)
    }
}

/// What an S3 answer means, its body untrusted.
fn judge((status, body): (u16, String)) -> Result<(), Failure> {
    let code = xml_element(&body, "Code");
    match status {
        200..=299 => Ok(()),
        404 if code == Some("NoSuchBucket") => Err(Failure::NoBucket),
        404 => Err(Failure::Missing),
        _ => {
            let mut detail = format!("HTTP {status}");
            for part in [code, xml_element(&body, "Message")].into_iter().flatten() {
                detail.push_str(": ");
                detail.push_str(&part.chars().take(300).collect::<String>());
            }
            Err(Failure::Other {
                detail,
                transient: transient_status(status),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_clock_behind_the_storages_does_not_end_holds_early() {
        let s3 = S3Requests::new(Bucket {
            base: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            allow_http: true,
            credential: object_store::aws::AwsCredential {
                key_id: "k".into(),
                secret_key: "s".into(),
                token: None,
            },
        })
        .unwrap();
        let day = Duration::from_secs(86_400);
        // The host thinks it is 30 days ago.
        let hold = Hold {
            days: 2,
            clock: vmvault_store::ManualClock::skewed(-30 * 86_400),
        };
        assert_eq!(
            s3.until(&hold),
            hold.until(),
            "no answer seen: the host's clock"
        );
        let now = SystemTime::now();
        let header = http::HeaderValue::from_str(&httpdate(now)).unwrap();
        s3.saw_date(Some(&header));
        let until = s3.until(&hold);
        assert!(until > now + 2 * day - Duration::from_secs(5), "{until:?}");
        assert!(until < now + 2 * day + Duration::from_secs(5), "{until:?}");
        // A host clock ahead of the storage's keeps its own, later, end.
        let ahead = Hold {
            days: 2,
            clock: vmvault_store::ManualClock::skewed(86_400),
        };
        assert!(s3.until(&ahead) >= ahead.until() - Duration::from_secs(1));
        // A garbled Date changes nothing.
        s3.saw_date(Some(&http::HeaderValue::from_static("yesterday")));
        assert!(s3.until(&hold) > now + day);
    }

    fn httpdate(t: SystemTime) -> String {
        chrono::DateTime::<chrono::Utc>::from(t)
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    }

    #[test]
    fn the_request_pieces_are_as_s3_takes_them() {
        // RFC 1321's test vector for "abc", in base64.
        assert_eq!(content_md5(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
        assert_eq!(
            date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)),
            "2027-01-15T08:00:00Z"
        );
        assert_eq!(
            utf8_percent_encode("v 1/chunks/ab/ab+c", KEY).to_string(),
            "v%201/chunks/ab/ab%2Bc"
        );
        assert!(judge((200, String::new())).is_ok());
        assert!(matches!(
            judge((404, "<Error><Code>NoSuchKey</Code></Error>".into())),
            Err(Failure::Missing)
        ));
        assert!(matches!(
            judge((503, "<Error><Code>SlowDown</Code></Error>".into())),
            Err(Failure::Other {
                transient: true,
                ..
            })
        ));
        assert!(matches!(
            judge((400, "<Error><Code>InvalidRequest</Code><Message>Bucket is missing Object Lock Configuration</Message></Error>".into())),
            Err(Failure::Other { transient: false, detail }) if detail.contains("Object Lock")
        ));
    }
}
