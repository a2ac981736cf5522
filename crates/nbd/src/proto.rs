//! The wire format of the NBD protocol (the `doc/proto.md` of the NBD project): constants,
//! message layouts and the parsers of option and request payloads that both ends share.
//!
//! Every integer is big-endian. Everything parsed here comes from the other end of a socket:
//! lengths are checked against the bytes actually given before anything is allocated.

use std::io::{self, Read, Write};

/// `NBDMAGIC`, the first 8 bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after `NBDMAGIC` from the server, and before every option from the client.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information items of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Error values of replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest read a server answers and a client asks for at once: 32 MiB.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option payload either end accepts (names, queries): 64 KiB.
pub const MAX_OPTION: u32 = 64 << 10;
/// The spec's bound on a string (export names, context names, messages).
pub const MAX_STRING: usize = 4096;

/// Request header: magic, flags, type, handle, offset, length.
pub const REQUEST_LEN: usize = 28;
/// Structured reply chunk header: magic, flags, type, handle, length.
pub const CHUNK_HEADER_LEN: usize = 20;

/// A command as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// `None` when the magic is wrong: the stream cannot be trusted any further.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let mut r = Bytes(b);
        if r.u32()? != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: r.u16()?,
            kind: r.u16()?,
            handle: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        })
    }
}

/// A cursor over untrusted bytes: every read says `None` instead of running past the end.
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A string of `n` bytes: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
    pub fn string(&mut self, n: usize) -> Option<String> {
        if n > MAX_STRING {
            return None;
        }
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        (!s.contains('\0')).then(|| s.to_string())
    }

    /// A string preceded by its 32-bit length.
    pub fn string32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.string(n)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's name and the items asked for.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut r = Bytes(data);
    let name = r.string32()?;
    let n = r.u16()? as usize;
    let items = (0..n).map(|_| r.u16()).collect::<Option<Vec<u16>>>()?;
    r.is_empty().then_some((name, items))
}

pub fn encode_info_request(name: &str, items: &[u16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + name.len() + 2 * items.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: the export's
/// name and the queries. The count is checked against the bytes present before anything is
/// allocated for it.
pub fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut r = Bytes(data);
    let name = r.string32()?;
    let n = r.u32()? as usize;
    if n > r.0.len() / 4 {
        return None;
    }
    let queries = (0..n)
        .map(|_| r.string32())
        .collect::<Option<Vec<String>>>()?;
    r.is_empty().then_some((name, queries))
}

pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Writes one option reply: magic, option, type, length, data.
pub fn write_option_reply(
    w: &mut impl Write,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Appends a structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(b: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
}

/// Appends a simple reply header.
pub fn simple_header(b: &mut Vec<u8>, error: u32, handle: u64) {
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
}

pub fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    Ok(u16::from_be_bytes(read_array(r)?))
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_be_bytes(read_array(r)?))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_be_bytes(read_array(r)?))
}

/// Reads exactly `n` bytes; the caller has bounded `n`.
pub fn read_vec(r: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads and drops `n` bytes in small pieces.
pub fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A name for an error value, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (cannot allocate memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (not supported)",
        ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_DF,
            kind: CMD_READ,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 65536,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn option_payloads_round_trip_and_refuse_garbage() {
        let b = encode_info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&b),
            Some(("disk".into(), vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        assert_eq!(parse_info_request(&b[..b.len() - 1]), None);
        let mut extra = b.clone();
        extra.push(0);
        assert_eq!(parse_info_request(&extra), None);

        let m = encode_meta_request("", &[BASE_ALLOCATION, "qemu:dirty-bitmap:bm0"]);
        let (name, q) = parse_meta_request(&m).unwrap();
        assert_eq!(name, "");
        assert_eq!(q, vec![BASE_ALLOCATION, "qemu:dirty-bitmap:bm0"]);
        // A count of queries the bytes cannot hold is refused before anything is allocated.
        let mut huge = encode_meta_request("x", &[]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge), None);
        // Strings: no NUL, valid UTF-8.
        assert_eq!(parse_meta_request(&encode_meta_request("a\0b", &[])), None);
        let mut bad_utf8 = encode_meta_request("ab", &[]);
        bad_utf8[4] = 0xff;
        assert_eq!(parse_meta_request(&bad_utf8), None);
    }
}
