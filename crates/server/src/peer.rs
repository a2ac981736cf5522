//! Who is at the other end of a TLS connection: a host agent proves its key in the handshake
//! (docs/design.md, "The host credential, and revocation").
//!
//! Agents offer the ALPN protocol `vmvault-agent/1`; only those connections are asked for a
//! client certificate, so that no browser or CLI ever is. Any self-signed Ed25519 certificate
//! is taken: the handshake proves the peer holds the key, and the key, not the certificate's
//! names or dates, is what the `hosts` table knows.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// What TLS said about the peer, given to every request of its connection.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The agent's key, when the connection came in with the agent ALPN and a certificate.
    pub agent: Option<HostKey>,
}

/// A host agent's key: the SHA-256 of its SubjectPublicKeyInfo (hex) finds the host; the raw
/// Ed25519 key is what enrollment binds the code's proof to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub id: String,
    pub public: [u8; 32],
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): a 32-byte key follows.
const ED25519_SPKI: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The key in a certificate, if it is an Ed25519 one. The certificate is parsed, not
/// searched: a key's bytes placed in a name field would otherwise pass as the key.
pub fn host_key(cert: &CertificateDer<'_>) -> Option<HostKey> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    if spki.len() != ED25519_SPKI.len() + 32 || spki[..ED25519_SPKI.len()] != ED25519_SPKI {
        return None;
    }
    let public: [u8; 32] = spki[ED25519_SPKI.len()..].try_into().ok()?;
    Some(HostKey {
        id: hex::encode(ring::digest::digest(&ring::digest::SHA256, spki)),
        public,
    })
}

/// The key of a raw Ed25519 public key, as [`host_key`] computes it from a certificate.
pub fn key_id(public: &[u8; 32]) -> String {
    let mut spki = ED25519_SPKI.to_vec();
    spki.extend_from_slice(public);
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki))
}

/// Takes any self-signed Ed25519 client certificate whose holder signs the handshake.
#[derive(Debug)]
pub struct AgentCertVerifier {
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AgentCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match host_key(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::General(
                "an agent's certificate must hold an Ed25519 key".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(
        names: Vec<String>,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(names).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_key_is_read_from_the_certificates_key_field_not_from_its_names() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let raw: [u8; 32] = key.public_key_raw().try_into().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let found = host_key(cert.der()).unwrap();
        assert_eq!(found.public, raw);
        assert_eq!(found.id, key_id(&raw));
        // Another key's certificate naming the first key's bytes in its subject: found as
        // its own key, never as the named one.
        let mut spki_text = String::new();
        for b in ED25519_SPKI.iter().chain(raw.iter()) {
            spki_text.push(char::from(*b));
        }
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::Utf8String(spki_text),
        );
        let forged = params.self_signed(&other).unwrap();
        let got = host_key(forged.der()).unwrap();
        assert_ne!(got.public, raw);
        assert_eq!(got.public.to_vec(), other.public_key_raw());
    }

    #[test]
    fn a_certificate_with_another_kind_of_key_is_no_host_key() {
        let cert = cert_with(vec!["agent".into()], &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(host_key(&cert).is_none());
        assert!(host_key(&CertificateDer::from(vec![1u8, 2, 3])).is_none());
    }
}
