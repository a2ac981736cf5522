//! `vmvault agent enroll URL --code CODE [--trust-fingerprint FP]`: turns the one-time code
//! into this host's credential (docs/design.md, "Enrollment"). The code never crosses the
//! wire: the agent proves it knows it by a keyed hash over the certificate it sees, and
//! checks the server's proof over what it will pin.

use vmvault_api::agent::{EnrollAnswer, EnrollRequest, ENROLL};

use crate::client::Client;
use crate::state::{AgentState, Pins};
use crate::{AgentError, Result};

const VERIFIER_CONTEXT: &str = "vmvault host enrollment 1";

fn keyed(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Enrolls; returns what was pinned.
pub fn enroll(state: &AgentState, server: &str, code: &str, trust: Option<&str>) -> Result<Pins> {
    if let Some(p) = state.pins()? {
        return Err(AgentError::Input(format!(
            "this host is enrolled already (as '{}' with {}); remove {} to enroll again",
            p.host,
            p.server,
            state.dir.join("server.json").display()
        )));
    }
    let (id, secret) = code
        .trim()
        .split_once('-')
        .filter(|(i, s)| i.len() == 8 && s.len() == 26)
        .ok_or_else(|| {
            AgentError::Input("the code is ID-SECRET as `host add` printed it".into())
        })?;
    let (id, secret) = (id.to_ascii_uppercase(), secret.to_ascii_uppercase());
    let identity = state.identity()?;
    let public = state.public_key(&identity)?;
    let client = Client::new(server, &identity, trust.map(str::to_string))?;
    // A first request shows the certificate, which the proof then covers.
    let _ = client.get_raw("/openapi.json", None);
    let fingerprint = client
        .seen_fingerprint()
        .ok_or_else(|| AgentError::Server(format!("{server}: no TLS connection could be made")))?;
    if let Some(t) = trust {
        if !t.eq_ignore_ascii_case(&fingerprint) {
            return Err(AgentError::Trust(format!(
                "the server's certificate is {fingerprint}, not {t} as --trust-fingerprint says"
            )));
        }
    }
    let verifier = blake3::derive_key(VERIFIER_CONTEXT, secret.as_bytes());
    let proof = keyed(
        &verifier,
        &[b"agent", fingerprint.as_bytes(), id.as_bytes(), &public],
    );
    let req = EnrollRequest {
        id: id.clone(),
        public_key: hex::encode(public),
        version: crate::VERSION.to_string(),
        proof: hex::encode(proof),
    };
    let answer: EnrollAnswer = client.post(ENROLL, None, &req)?;
    let want = keyed(
        &verifier,
        &[
            b"server",
            fingerprint.as_bytes(),
            id.as_bytes(),
            &public,
            &answer.host_id.to_le_bytes(),
            answer.host.as_bytes(),
            answer.release_key.as_bytes(),
        ],
    );
    let given: Option<[u8; 32]> = hex::decode(&answer.server_proof)
        .ok()
        .and_then(|g| g.try_into().ok());
    if given.map(blake3::Hash::from) != Some(blake3::Hash::from(want))
        || answer.fingerprint != fingerprint
    {
        return Err(AgentError::Trust(
            "the server's answer does not prove it knows the code: this connection does not \
             reach the server that made it (nothing was pinned)"
                .into(),
        ));
    }
    let pins = Pins {
        server: server.trim_end_matches('/').to_string(),
        fingerprint,
        host: answer.host,
        host_id: answer.host_id,
        release_key: answer.release_key,
    };
    state.save_pins(&pins)?;
    Ok(pins)
}
