//! The chunk codec: keyed digest, zstd, AES-256-GCM, in the envelope of `envelope.rs`.
//!
//! AES-GCM comes from `ring` because its AES-NI/VAES code runs at about 3.4 GB/s per core on
//! this project's machines where RustCrypto's `aes-gcm` measured 0.97 GB/s (docs/benchmarks.md).
//! Nonces are random: every object is written once under a fresh 96-bit nonce, and a vault
//! writes far fewer than the 2^32 objects per key after which random nonces would need care.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::envelope::{Compression, Encryption, Header, ObjectKind, HEADER_LEN, TRAILER_LEN};
use crate::error::{invalid, FormatError};
use crate::Digest;

/// The two secrets of an encrypted vault: one encrypts, one keys the chunk digests so that
/// chunk names reveal nothing about their contents.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub data: [u8; 32],
    pub id: [u8; 32],
}

impl Keys {
    pub fn generate() -> Keys {
        let mut data = [0u8; 32];
        let mut id = [0u8; 32];
        crate::random_bytes(&mut data);
        crate::random_bytes(&mut id);
        Keys { data, id }
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.data = [0; 32];
        self.id = [0; 32];
    }
}

/// Seals and opens objects of one vault. Cheap to share between threads.
pub struct Codec {
    aead: Option<LessSafeKey>,
    id_key: Option<[u8; 32]>,
    level: i32,
}

impl Codec {
    /// A codec for an unencrypted vault: plain BLAKE3 digests, a BLAKE3 trailer as checksum.
    pub fn plain(level: i32) -> Codec {
        Codec {
            aead: None,
            id_key: None,
            level,
        }
    }

    pub fn encrypted(keys: &Keys, level: i32) -> Codec {
        let key = UnboundKey::new(&AES_256_GCM, &keys.data).expect("32-byte AES-256 key");
        Codec {
            aead: Some(LessSafeKey::new(key)),
            id_key: Some(keys.id),
            level,
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.aead.is_some()
    }

    /// The name of a chunk or index: BLAKE3 of its plain bytes, keyed when the vault is encrypted.
    pub fn digest(&self, data: &[u8]) -> Digest {
        let hash = match &self.id_key {
            Some(key) => blake3::keyed_hash(key, data),
            None => blake3::hash(data),
        };
        Digest(*hash.as_bytes())
    }

    /// A per-thread sealer that keeps its buffers and zstd context between objects.
    pub fn sealer(&self) -> Sealer<'_> {
        Sealer {
            codec: self,
            compressor: zstd::bulk::Compressor::new(self.level).expect("zstd level in range"),
            scratch: Vec::new(),
        }
    }

    /// Seals one object; a convenience over [`Sealer::seal`] for one-off objects.
    pub fn seal(&self, kind: ObjectKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.sealer().seal(kind, payload, &mut out);
        out
    }

    /// Opens an object of `kind`, refusing one whose payload would exceed `max_plain` bytes.
    /// A convenience over [`Opener::open`] for one-off objects.
    pub fn open(
        &self,
        kind: ObjectKind,
        bytes: &[u8],
        max_plain: u64,
    ) -> Result<Vec<u8>, FormatError> {
        let mut copy = bytes.to_vec();
        Ok(self.opener().open(kind, &mut copy, max_plain)?.to_vec())
    }

    /// A per-thread opener that keeps its zstd context and output buffer between objects.
    pub fn opener(&self) -> Opener<'_> {
        Opener {
            codec: self,
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context"),
            out: Vec::new(),
        }
    }
}

/// Opens objects for one thread: decrypts in place and decompresses into a reused buffer, so
/// a restore allocates nothing per chunk.
pub struct Opener<'a> {
    codec: &'a Codec,
    decompressor: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
}

impl Opener<'_> {
    /// Opens the object held in `bytes` (decrypting it there) and returns its payload, which
    /// borrows `bytes` or this opener. A payload over `max_plain` bytes is refused unread.
    pub fn open<'b>(
        &'b mut self,
        kind: ObjectKind,
        bytes: &'b mut [u8],
        max_plain: u64,
    ) -> Result<&'b [u8], FormatError> {
        let what = kind.name();
        let header = Header::decode(kind, bytes)?;
        if header.plain_len > max_plain {
            return Err(FormatError::TooLarge {
                what,
                needed: header.plain_len,
                limit: max_plain,
            });
        }
        let total = bytes.len();
        let body_len = total - HEADER_LEN - TRAILER_LEN;
        match header.encryption {
            Encryption::Aes256Gcm => {
                let aead = self
                    .codec
                    .aead
                    .as_ref()
                    .ok_or(FormatError::NeedKey { what })?;
                let (head, rest) = bytes.split_at_mut(HEADER_LEN);
                let nonce = Nonce::assume_unique_for_key(header.nonce);
                aead.open_in_place(nonce, Aad::from(&*head), rest)
                    .map_err(|_| FormatError::Authentication { what })?;
            }
            Encryption::None => {
                if self.codec.aead.is_some() {
                    return Err(invalid(what, "stored unencrypted in an encrypted vault"));
                }
                let sum = blake3::hash(&bytes[..total - TRAILER_LEN]);
                if sum.as_bytes()[..TRAILER_LEN] != bytes[total - TRAILER_LEN..] {
                    return Err(FormatError::Checksum { what });
                }
            }
        }
        let body = &bytes[HEADER_LEN..HEADER_LEN + body_len];
        let plain: &[u8] = match header.compression {
            Compression::None => body,
            Compression::Zstd => {
                // The output can never outgrow the header's claim, already checked.
                self.out.clear();
                self.out.reserve(header.plain_len as usize);
                self.decompressor
                    .decompress_to_buffer(body, &mut self.out)
                    .map_err(|e| invalid(what, format!("zstd: {e}")))?;
                &self.out
            }
        };
        if plain.len() as u64 != header.plain_len {
            return Err(invalid(what, "payload length differs from the header"));
        }
        Ok(plain)
    }

    /// Opens the object in `bytes` and leaves its payload there, at the returned range: in
    /// place when it was stored uncompressed, else by trading buffers with this opener (no
    /// copy either way). For reads that must judge an object before handing it on.
    pub fn open_vec(
        &mut self,
        kind: ObjectKind,
        bytes: &mut Vec<u8>,
        max_plain: u64,
    ) -> Result<std::ops::Range<usize>, FormatError> {
        let (ptr, len) = {
            let plain = self.open(kind, bytes, max_plain)?;
            (plain.as_ptr(), plain.len())
        };
        if std::ptr::eq(ptr, self.out.as_ptr()) && len == self.out.len() {
            std::mem::swap(bytes, &mut self.out);
            Ok(0..len)
        } else {
            Ok(HEADER_LEN..HEADER_LEN + len)
        }
    }
}

/// Seals objects for one thread, reusing its zstd context and output buffer.
pub struct Sealer<'a> {
    codec: &'a Codec,
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

/// How much of a chunk is tried first to decide whether compressing it is worth it.
const PROBE_LEN: usize = 64 * 1024;

impl Sealer<'_> {
    /// Writes the sealed form of `payload` into `out` (cleared first).
    ///
    /// Compression is kept only where it shrinks: a 64 KiB probe decides for larger payloads
    /// so that random data (a third of a typical disk) costs almost nothing to pass through.
    pub fn seal(&mut self, kind: ObjectKind, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.resize(HEADER_LEN, 0);
        let worth_trying = payload.len() <= PROBE_LEN || self.shrinks(&payload[..PROBE_LEN]);
        let mut compression = Compression::None;
        if worth_trying {
            let bound = zstd::zstd_safe::compress_bound(payload.len());
            out.resize(HEADER_LEN + bound, 0);
            let n = self
                .compressor
                .compress_to_buffer(payload, &mut out[HEADER_LEN..])
                .expect("buffer sized by compress_bound");
            out.truncate(HEADER_LEN + n);
            if n < payload.len() {
                compression = Compression::Zstd;
            } else {
                out.truncate(HEADER_LEN);
            }
        }
        if compression == Compression::None {
            out.extend_from_slice(payload);
        }
        let mut header = Header {
            kind,
            compression,
            encryption: Encryption::None,
            plain_len: payload.len() as u64,
            nonce: [0; 12],
        };
        match &self.codec.aead {
            Some(aead) => {
                header.encryption = Encryption::Aes256Gcm;
                crate::random_bytes(&mut header.nonce);
                let head = header.encode();
                out[..HEADER_LEN].copy_from_slice(&head);
                let tag = aead
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(header.nonce),
                        Aad::from(&head),
                        &mut out[HEADER_LEN..],
                    )
                    .expect("object smaller than the AES-GCM limit");
                out.extend_from_slice(tag.as_ref());
            }
            None => {
                out[..HEADER_LEN].copy_from_slice(&header.encode());
                let sum = blake3::hash(out);
                out.extend_from_slice(&sum.as_bytes()[..TRAILER_LEN]);
            }
        }
    }

    fn shrinks(&mut self, probe: &[u8]) -> bool {
        self.scratch
            .resize(zstd::zstd_safe::compress_bound(probe.len()), 0);
        match self.compressor.compress_to_buffer(probe, &mut self.scratch) {
            // Keep compressing unless the probe saved less than 3%.
            Ok(n) => n < probe.len() - probe.len() / 32,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codecs() -> Vec<Codec> {
        vec![Codec::plain(1), Codec::encrypted(&Keys::generate(), 1)]
    }

    #[test]
    fn round_trips_compressible_random_and_empty() {
        let text: Vec<u8> = (0..300_000u32)
            .map(|i| b"abc \n"[(i % 5) as usize])
            .collect();
        let mut random = vec![0u8; 200_000];
        crate::random_bytes(&mut random);
        for codec in codecs() {
            for payload in [&text[..], &random[..], &[][..], &b"x"[..]] {
                let sealed = codec.seal(ObjectKind::Chunk, payload);
                let opened = codec.open(ObjectKind::Chunk, &sealed, 1 << 30).unwrap();
                assert_eq!(opened, payload);
            }
            let sealed = codec.seal(ObjectKind::Chunk, &text);
            assert!(sealed.len() < text.len() / 4, "text is compressed");
            let sealed = codec.seal(ObjectKind::Chunk, &random);
            assert_eq!(sealed.len(), random.len() + HEADER_LEN + TRAILER_LEN);
            assert_eq!(sealed[9], Compression::None as u8, "random kept raw");
        }
    }

    #[test]
    fn open_vec_leaves_the_payload_in_the_buffer() {
        let text: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let mut random = vec![0u8; 50_000];
        crate::random_bytes(&mut random);
        for codec in codecs() {
            let mut opener = codec.opener();
            for payload in [&text[..], &random[..], &[][..]] {
                let mut buf = codec.seal(ObjectKind::Chunk, payload);
                let range = opener
                    .open_vec(ObjectKind::Chunk, &mut buf, 1 << 20)
                    .unwrap();
                assert_eq!(&buf[range], payload);
            }
            let mut bad = codec.seal(ObjectKind::Chunk, &text);
            bad[50] ^= 1;
            assert!(opener
                .open_vec(ObjectKind::Chunk, &mut bad, 1 << 20)
                .is_err());
        }
    }

    #[test]
    fn encrypted_bodies_hide_the_payload() {
        let codec = Codec::encrypted(&Keys::generate(), 1);
        let payload = vec![0x41u8; 1000];
        let sealed = codec.seal(ObjectKind::Manifest, &payload);
        assert!(!sealed.windows(16).any(|w| w == &payload[..16]));
        let other = Codec::encrypted(&Keys::generate(), 1);
        assert_eq!(
            other.open(ObjectKind::Manifest, &sealed, 1 << 20),
            Err(FormatError::Authentication {
                what: "recovery point manifest"
            })
        );
    }

    #[test]
    fn kinds_are_not_interchangeable() {
        let codec = Codec::plain(1);
        let sealed = codec.seal(ObjectKind::Index, b"payload");
        assert!(matches!(
            codec.open(ObjectKind::Chunk, &sealed, 100),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn size_limit_is_checked_before_allocating() {
        let codec = Codec::plain(1);
        let sealed = codec.seal(ObjectKind::Chunk, &[7u8; 5000]);
        assert!(matches!(
            codec.open(ObjectKind::Chunk, &sealed, 4999),
            Err(FormatError::TooLarge { .. })
        ));
    }

    #[test]
    fn keyed_digest_differs_from_plain() {
        let keys = Keys::generate();
        let a = Codec::encrypted(&keys, 1).digest(b"data");
        let b = Codec::plain(1).digest(b"data");
        assert_ne!(a, b);
        assert_eq!(a, Codec::encrypted(&keys, 1).digest(b"data"));
    }

    proptest! {
        #[test]
        fn every_flipped_bit_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..2000),
                                         pos in any::<prop::sample::Index>(), bit in 0u8..8,
                                         encrypted in any::<bool>()) {
            let codec = if encrypted { Codec::encrypted(&Keys::generate(), 1) } else { Codec::plain(1) };
            let mut sealed = codec.seal(ObjectKind::Chunk, &payload);
            let at = pos.index(sealed.len());
            sealed[at] ^= 1 << bit;
            prop_assert!(codec.open(ObjectKind::Chunk, &sealed, 1 << 20).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for codec in codecs() {
                let _ = codec.open(ObjectKind::Chunk, &bytes, 1 << 20);
            }
        }
    }
}
