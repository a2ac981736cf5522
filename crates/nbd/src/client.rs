//! The client: fixed newstyle handshake, `NBD_OPT_GO` with the export's name, structured
//! replies, metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`), reads and
//! block status. One request at a time; every reply is checked before it is believed.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::proto::*;
use crate::{NbdError, Result};

mod transmit;

/// What to ask the server for while connecting.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The export's name; empty for the server's default export.
    pub export: String,
    /// Metadata contexts to select, e.g. `base:allocation` or `qemu:dirty-bitmap:bm0`. Each
    /// must be granted, or connecting fails.
    pub meta_contexts: Vec<String>,
}

/// A run of the export with one status: for `base:allocation`, [`STATE_HOLE`] and
/// [`STATE_ZERO`]; for `qemu:dirty-bitmap:NAME`, [`STATE_DIRTY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

pub struct Client<S: Read + Write> {
    s: S,
    size: u64,
    flags: u16,
    structured: bool,
    max_block: u32,
    contexts: Vec<(u32, String)>,
    handle: u64,
    /// Set when a reply could not be read whole: the stream's position is unknown.
    broken: bool,
    /// In the transmission phase (after `NBD_OPT_GO`), not haggling over options.
    transmitting: bool,
    disconnected: bool,
}

impl Client<UnixStream> {
    pub fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Self> {
        Client::handshake(UnixStream::connect(path)?, opts)
    }
}

impl Client<TcpStream> {
    pub fn connect_tcp(addr: impl ToSocketAddrs, opts: &ConnectOptions) -> Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::handshake(s, opts)
    }
}

/// Option reply types by name, for messages.
fn reply_name(kind: u32) -> String {
    match kind {
        REP_ERR_UNSUP => "unsupported".into(),
        REP_ERR_POLICY => "forbidden by policy".into(),
        REP_ERR_INVALID => "invalid".into(),
        REP_ERR_UNKNOWN => "unknown export".into(),
        REP_ERR_TOO_BIG => "too big".into(),
        k => format!("error {k:#x}"),
    }
}

impl<S: Read + Write> Client<S> {
    /// Negotiates over a connected stream: structured replies, the metadata contexts asked
    /// for, then `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` on a server without it).
    pub fn handshake(mut s: S, opts: &ConnectOptions) -> Result<Self> {
        if read_u64(&mut s)? != NBDMAGIC {
            return Err(NbdError::server("not an NBD server (no NBDMAGIC)"));
        }
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(NbdError::Unsupported(
                "the server speaks only the old-style handshake".into(),
            ));
        }
        let hflags = read_u16(&mut s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported(
                "the server does not speak the fixed newstyle handshake".into(),
            ));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        s.write_all(&cflags.to_be_bytes())?;
        let mut c = Client {
            s,
            size: 0,
            flags: 0,
            structured: false,
            max_block: MAX_REQUEST,
            contexts: Vec::new(),
            handle: 0,
            broken: false,
            transmitting: false,
            disconnected: false,
        };
        c.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = c.option_reply(OPT_STRUCTURED_REPLY)?;
        c.structured = kind == REP_ACK;
        if !opts.meta_contexts.is_empty() {
            c.select_contexts(opts)?;
        }
        c.go(&opts.export, no_zeroes)?;
        c.transmitting = true;
        Ok(c)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        Ok(self.s.write_all(&b)?)
    }

    /// One option reply: its type and data, checked to answer `option`.
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        if read_u64(&mut self.s)? != REPLY_MAGIC {
            return Err(NbdError::server("an option reply without its magic"));
        }
        let answered = read_u32(&mut self.s)?;
        let kind = read_u32(&mut self.s)?;
        let len = read_u32(&mut self.s)?;
        if answered != option {
            return Err(NbdError::server(format!(
                "a reply to option {answered} when {option} was asked"
            )));
        }
        if len > MAX_OPTION {
            return Err(NbdError::server(format!("an option reply of {len} bytes")));
        }
        Ok((kind, read_vec(&mut self.s, len as usize)?))
    }

    fn refused(option: &'static str, kind: u32, data: &[u8]) -> NbdError {
        NbdError::Refused {
            option,
            reply: reply_name(kind),
            message: String::from_utf8_lossy(data).into_owned(),
        }
    }

    fn select_contexts(&mut self, opts: &ConnectOptions) -> Result<()> {
        if !self.structured {
            return Err(NbdError::Unsupported(
                "the server has no structured replies, so no metadata contexts".into(),
            ));
        }
        let queries: Vec<&str> = opts.meta_contexts.iter().map(String::as_str).collect();
        let data = encode_meta_request(&opts.export, &queries);
        self.send_option(OPT_SET_META_CONTEXT, &data)?;
        loop {
            match self.option_reply(OPT_SET_META_CONTEXT)? {
                (REP_ACK, _) => break,
                (REP_META_CONTEXT, data) => {
                    let mut r = Bytes(&data);
                    let (Some(id), Some(name)) = (r.u32(), r.string(data.len().saturating_sub(4)))
                    else {
                        return Err(NbdError::server("a malformed metadata context reply"));
                    };
                    self.contexts.push((id, name));
                }
                (kind, data) if kind & REP_FLAG_ERROR != 0 => {
                    return Err(Self::refused("SET_META_CONTEXT", kind, &data));
                }
                (kind, _) => {
                    return Err(NbdError::server(format!(
                        "reply type {kind} to SET_META_CONTEXT"
                    )))
                }
            }
        }
        for want in &opts.meta_contexts {
            if !self.contexts.iter().any(|(_, n)| n == want) {
                return Err(NbdError::Unsupported(format!(
                    "the NBD server does not offer metadata context {want:?} on export {:?}",
                    opts.export
                )));
            }
        }
        Ok(())
    }

    fn go(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        self.send_option(OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE]))?;
        let mut got_export = false;
        loop {
            match self.option_reply(OPT_GO)? {
                (REP_ACK, _) if got_export => return Ok(()),
                (REP_ACK, _) => {
                    return Err(NbdError::server("GO acknowledged without export info"))
                }
                (REP_INFO, data) => {
                    let mut r = Bytes(&data);
                    match r.u16() {
                        Some(INFO_EXPORT) if data.len() == 12 => {
                            self.size = r.u64().unwrap_or(0);
                            self.flags = r.u16().unwrap_or(0);
                            got_export = true;
                        }
                        Some(INFO_BLOCK_SIZE) if data.len() == 14 => {
                            let (_min, _pref, max) = (r.u32(), r.u32(), r.u32().unwrap_or(0));
                            if max == 0 {
                                return Err(NbdError::server("a maximum block size of 0"));
                            }
                            self.max_block = max.min(MAX_REQUEST);
                        }
                        Some(INFO_EXPORT | INFO_BLOCK_SIZE) => {
                            return Err(NbdError::server("a malformed INFO reply"))
                        }
                        // Names, descriptions and later items are not needed.
                        _ => {}
                    }
                }
                (REP_ERR_UNSUP, _) => return self.export_name(export, no_zeroes),
                (kind, data) if kind & REP_FLAG_ERROR != 0 => {
                    return Err(Self::refused("GO", kind, &data));
                }
                (kind, _) => return Err(NbdError::server(format!("reply type {kind} to GO"))),
            }
        }
    }

    /// The old way into transmission, for servers without `NBD_OPT_GO`.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        self.size = read_u64(&mut self.s)?;
        self.flags = read_u16(&mut self.s)?;
        if !no_zeroes {
            read_array::<124>(&mut self.s)?;
        }
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags (`FLAG_READ_ONLY`, ...).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The metadata contexts the server granted, by name.
    pub fn meta_contexts(&self) -> impl Iterator<Item = &str> {
        self.contexts.iter().map(|(_, n)| n.as_str())
    }

    fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<u64> {
        if self.broken {
            return Err(NbdError::Unsupported(
                "this NBD connection failed earlier and cannot be used".into(),
            ));
        }
        self.handle = self.handle.wrapping_add(1);
        let req = Request {
            flags,
            kind,
            handle: self.handle,
            offset,
            len,
        };
        self.s.write_all(&req.encode())?;
        Ok(self.handle)
    }

    /// Ends the session cleanly with `NBD_CMD_DISC`.
    pub fn disconnect(mut self) -> Result<()> {
        self.disc()
    }

    fn disc(&mut self) -> Result<()> {
        if self.disconnected || self.broken {
            return Ok(());
        }
        self.disconnected = true;
        if self.transmitting {
            self.send(CMD_DISC, 0, 0, 0)?;
        } else {
            // Negotiation failed: the soft way out of it, without waiting for the answer.
            self.send_option(OPT_ABORT, &[])?;
        }
        Ok(self.s.flush()?)
    }
}

impl<S: Read + Write> Drop for Client<S> {
    fn drop(&mut self) {
        let _ = self.disc();
    }
}
