//! The server: one read-only export, the fixed newstyle handshake, and a thread per client.
//!
//! Options: `NBD_OPT_EXPORT_NAME`, `GO`, `INFO`, `LIST`, `ABORT`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`); any other is answered
//! `NBD_REP_ERR_UNSUP`, TLS included. Commands: `READ` (with structured replies, holes are
//! `OFFSET_HOLE` chunks), `BLOCK_STATUS` (holes are `HOLE|ZERO`), `FLUSH` (nothing to flush),
//! `DISC`; `WRITE`, `TRIM` and `WRITE_ZEROES` are refused with `EPERM`.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::proto::*;
use crate::{Export, NbdError, Result};

type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Connections served at once by default; more are closed as they arrive.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Serves one export under one name (the empty name, the default export, reaches it too).
pub struct Server {
    name: String,
    description: String,
    export: Arc<dyn Export>,
    log: Log,
    max_connections: usize,
    connections: AtomicUsize,
}

/// Where a session stands after an option.
enum Next {
    Option,
    Transmit,
    Close,
}

struct Session<'a, S> {
    server: &'a Server,
    s: S,
    no_zeroes: bool,
    structured: bool,
    /// The id `base:allocation` was selected under, if it was.
    allocation: Option<u32>,
}

impl Server {
    pub fn new(name: impl Into<String>, export: Arc<dyn Export>) -> Server {
        Server {
            name: name.into(),
            description: String::new(),
            export,
            log: Arc::new(|_: &str| {}),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connections: AtomicUsize::new(0),
        }
    }

    /// How many connections are served at once (each has a thread); more are closed.
    pub fn with_max_connections(mut self, n: usize) -> Server {
        self.max_connections = n;
        self
    }

    /// A description for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub fn with_description(mut self, description: impl Into<String>) -> Server {
        self.description = description.into();
        self
    }

    /// Told of every connection that opens or ends, and why it ended badly.
    pub fn with_log(mut self, log: impl Fn(&str) + Send + Sync + 'static) -> Server {
        self.log = Arc::new(log);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves clients from a TCP listener, one thread each, until accepting fails for good.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e),
            };
            let _ = stream.set_nodelay(true);
            self.spawn(stream, peer.to_string());
        }
    }

    /// Serves clients from a unix socket listener, one thread each.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        let mut n = 0u64;
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e),
            };
            n += 1;
            self.spawn(stream, format!("unix client {n}"));
        }
    }

    fn spawn<S: Read + Write + Send + 'static>(self: &Arc<Self>, stream: S, peer: String) {
        if self.connections.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            (self.log)(&format!(
                "{peer}: refused, {} connections are open already",
                self.max_connections
            ));
            return;
        }
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                (server.log)(&format!("{peer}: connected"));
                match server.serve(stream) {
                    Ok(()) => (server.log)(&format!("{peer}: disconnected")),
                    Err(e) => (server.log)(&format!("{peer}: {e}")),
                }
                server.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            (self.log)(&format!("cannot start a thread for a client: {e}"));
        }
    }

    /// Serves one connection to its end: handshake, then commands until the client
    /// disconnects. A clean disconnect (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, or the client
    /// closing between messages) is `Ok`.
    pub fn serve<S: Read + Write>(&self, stream: S) -> Result<()> {
        let mut session = Session {
            server: self,
            s: stream,
            no_zeroes: false,
            structured: false,
            allocation: None,
        };
        match session.handshake() {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(NbdError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        match session.transmit() {
            Err(NbdError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            r => r,
        }
    }

    fn knows(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let df = if structured { FLAG_SEND_DF } else { 0 };
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | df
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

impl<S: Read + Write> Session<'_, S> {
    /// The handshake and option haggling; true when transmission begins.
    fn handshake(&mut self) -> Result<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&hello)?;
        let client_flags = read_u32(&mut self.s)?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::client(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        self.no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            if read_u64(&mut self.s)? != IHAVEOPT {
                return Err(NbdError::client("an option without the IHAVEOPT magic"));
            }
            let option = read_u32(&mut self.s)?;
            let len = read_u32(&mut self.s)?;
            if len > MAX_OPTION {
                return Err(NbdError::client(format!(
                    "option {option} of {len} bytes (at most {MAX_OPTION})"
                )));
            }
            let data = read_vec(&mut self.s, len as usize)?;
            match self.option(option, &data)? {
                Next::Option => {}
                Next::Transmit => return Ok(true),
                Next::Close => return Ok(false),
            }
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<()> {
        Ok(write_option_reply(&mut self.s, option, kind, data)?)
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        let server = self.server;
        match option {
            OPT_EXPORT_NAME => {
                let name = Bytes(data).string(data.len());
                if !name.is_some_and(|n| server.knows(&n)) {
                    // This option cannot be answered with an error: the spec says hang up.
                    return Ok(Next::Close);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&server.export.size().to_be_bytes());
                b.extend_from_slice(&server.transmission_flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                self.s.write_all(&b)?;
                Ok(Next::Transmit)
            }
            OPT_ABORT => {
                // The client may already be gone: that is fine.
                let _ = self.reply(option, REP_ACK, &[]);
                Ok(Next::Close)
            }
            OPT_LIST if !data.is_empty() => {
                self.error(option, REP_ERR_INVALID, "LIST takes no data")
            }
            OPT_LIST => {
                let mut b = Vec::new();
                b.extend_from_slice(&(server.name.len() as u32).to_be_bytes());
                b.extend_from_slice(server.name.as_bytes());
                b.extend_from_slice(server.description.as_bytes());
                self.reply(option, REP_SERVER, &b)?;
                self.reply(option, REP_ACK, &[])?;
                Ok(Next::Option)
            }
            OPT_INFO | OPT_GO => {
                let Some((name, items)) = parse_info_request(data) else {
                    return self.error(option, REP_ERR_INVALID, "malformed INFO/GO request");
                };
                if !server.knows(&name) {
                    return self.error(option, REP_ERR_UNKNOWN, &format!("no export {name:?}"));
                }
                self.info_replies(option, &items)?;
                self.reply(option, REP_ACK, &[])?;
                Ok(if option == OPT_GO {
                    Next::Transmit
                } else {
                    Next::Option
                })
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(option, REP_ACK, &[])?;
                Ok(Next::Option)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            OPT_STARTTLS => self.error(option, REP_ERR_UNSUP, "this server does not offer TLS"),
            _ => self.error(option, REP_ERR_UNSUP, "unknown option"),
        }
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) -> Result<Next> {
        self.reply(option, kind, message.as_bytes())?;
        Ok(Next::Option)
    }

    fn info_replies(&mut self, option: u32, items: &[u16]) -> Result<()> {
        let server = self.server;
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&server.export.size().to_be_bytes());
        export.extend_from_slice(&server.transmission_flags(self.structured).to_be_bytes());
        self.reply(option, REP_INFO, &export)?;
        let mut block = Vec::with_capacity(14);
        block.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [1u32, 4096, MAX_REQUEST] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &block)?;
        let text = |kind: u16, s: &str| [&kind.to_be_bytes()[..], s.as_bytes()].concat();
        if items.contains(&INFO_NAME) {
            self.reply(option, REP_INFO, &text(INFO_NAME, &server.name))?;
        }
        if items.contains(&INFO_DESCRIPTION) && !server.description.is_empty() {
            self.reply(
                option,
                REP_INFO,
                &text(INFO_DESCRIPTION, &server.description),
            )?;
        }
        Ok(())
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.allocation = None;
        }
        if !self.structured {
            return self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.error(
                option,
                REP_ERR_INVALID,
                "malformed metadata context request",
            );
        };
        if !self.server.knows(&name) {
            return self.error(option, REP_ERR_UNKNOWN, &format!("no export {name:?}"));
        }
        let wanted = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        if wanted {
            let id: u32 = if set { 1 } else { 0 };
            let mut b = id.to_be_bytes().to_vec();
            b.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &b)?;
            if set {
                self.allocation = Some(id);
            }
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Next::Option)
    }

    /// The transmission phase: one command at a time until `NBD_CMD_DISC`.
    fn transmit(&mut self) -> Result<()> {
        loop {
            let header = read_array::<REQUEST_LEN>(&mut self.s)?;
            let req = Request::decode(&header)
                .ok_or_else(|| NbdError::client("a request without the request magic"))?;
            match req.kind {
                CMD_DISC => return Ok(()),
                CMD_READ => self.read(&req)?,
                CMD_BLOCK_STATUS => self.block_status(&req)?,
                CMD_FLUSH if req.flags & !CMD_FLAG_FUA != 0 => {
                    self.fail(&req, EINVAL, "bad flags")?
                }
                CMD_FLUSH => self.done(&req)?,
                CMD_WRITE => {
                    if req.len > MAX_REQUEST {
                        return Err(NbdError::client(format!(
                            "a write of {} bytes (at most {MAX_REQUEST})",
                            req.len
                        )));
                    }
                    skip(&mut self.s, req.len as u64)?;
                    self.fail(&req, EPERM, "this export is read-only")?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    self.fail(&req, EPERM, "this export is read-only")?
                }
                _ => self.fail(&req, EINVAL, "unknown command")?,
            }
        }
    }

    /// Checks a request's range: inside the export and, for reads, at most `max` bytes.
    fn check_range(&self, req: &Request, max: u32) -> std::result::Result<(), &'static str> {
        let end = req.offset.checked_add(req.len as u64);
        if req.len == 0 {
            Err("zero length")
        } else if req.len > max {
            Err("longer than the maximum block size")
        } else if end.is_none_or(|end| end > self.server.export.size()) {
            Err("past the end of the export")
        } else {
            Ok(())
        }
    }

    /// The export's runs over the request, made to cover it exactly: merged, clamped, and
    /// filled out with data where the export said too little.
    fn runs(&self, req: &Request) -> io::Result<Vec<(u64, bool)>> {
        let len = req.len as u64;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut covered = 0u64;
        for (n, data) in self.server.export.extents(req.offset, len)? {
            let n = n.min(len - covered);
            if n == 0 {
                continue;
            }
            match out.last_mut() {
                Some((m, d)) if *d == data => *m += n,
                _ => out.push((n, data)),
            }
            covered += n;
        }
        if covered < len {
            match out.last_mut() {
                Some((m, true)) => *m += len - covered,
                _ => out.push((len - covered, true)),
            }
        }
        Ok(out)
    }

    fn read(&mut self, req: &Request) -> Result<()> {
        let allowed = CMD_FLAG_FUA | if self.structured { CMD_FLAG_DF } else { 0 };
        if req.flags & !allowed != 0 {
            return self.fail(req, EINVAL, "bad flags for READ");
        }
        if let Err(why) = self.check_range(req, MAX_REQUEST) {
            return self.fail(req, EINVAL, why);
        }
        let runs = match self.runs(req) {
            Ok(r) => r,
            Err(e) => return self.fail(req, EIO, &e.to_string()),
        };
        let whole = !self.structured || req.flags & CMD_FLAG_DF != 0;
        let mut out = Vec::with_capacity(req.len as usize + 32 * runs.len() + 32);
        if whole {
            if self.structured {
                chunk_header(
                    &mut out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.handle,
                    req.len + 8,
                );
                out.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                simple_header(&mut out, 0, req.handle);
            }
        }
        let mut pos = 0u64;
        for (i, &(n, data)) in runs.iter().enumerate() {
            let off = req.offset + pos;
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            if !whole && !data {
                chunk_header(&mut out, flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
                out.extend_from_slice(&off.to_be_bytes());
                out.extend_from_slice(&(n as u32).to_be_bytes());
            } else {
                if !whole {
                    chunk_header(
                        &mut out,
                        flags,
                        REPLY_TYPE_OFFSET_DATA,
                        req.handle,
                        n as u32 + 8,
                    );
                    out.extend_from_slice(&off.to_be_bytes());
                }
                let start = out.len();
                out.resize(start + n as usize, 0);
                if data {
                    if let Err(e) = self.server.export.read_at(off, &mut out[start..]) {
                        return self.fail(req, EIO, &format!("reading at {off}: {e}"));
                    }
                }
            }
            pos += n;
        }
        Ok(self.s.write_all(&out)?)
    }

    fn block_status(&mut self, req: &Request) -> Result<()> {
        let Some(id) = self.allocation.filter(|_| self.structured) else {
            return self.fail(req, EINVAL, "no metadata context was selected");
        };
        if req.flags & !CMD_FLAG_REQ_ONE != 0 {
            return self.fail(req, EINVAL, "bad flags for BLOCK_STATUS");
        }
        if let Err(why) = self.check_range(req, u32::MAX) {
            return self.fail(req, EINVAL, why);
        }
        let mut runs = match self.runs(req) {
            Ok(r) => r,
            Err(e) => return self.fail(req, EIO, &e.to_string()),
        };
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            runs.truncate(1);
        }
        let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 4 + 8 * runs.len());
        let len = 4 + 8 * runs.len() as u32;
        chunk_header(
            &mut out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.handle,
            len,
        );
        out.extend_from_slice(&id.to_be_bytes());
        for (n, data) in runs {
            let status = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            out.extend_from_slice(&(n as u32).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
        Ok(self.s.write_all(&out)?)
    }

    /// A successful reply without data.
    fn done(&mut self, req: &Request) -> Result<()> {
        let mut out = Vec::with_capacity(CHUNK_HEADER_LEN);
        if self.structured {
            chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.handle, 0);
        } else {
            simple_header(&mut out, 0, req.handle);
        }
        Ok(self.s.write_all(&out)?)
    }

    /// An error reply: an error chunk with a message when structured replies are on.
    fn fail(&mut self, req: &Request, errno: u32, message: &str) -> Result<()> {
        let mut out = Vec::new();
        if self.structured {
            let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
            let len = 6 + message.len() as u32;
            chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req.handle, len);
            out.extend_from_slice(&errno.to_be_bytes());
            out.extend_from_slice(&(message.len() as u16).to_be_bytes());
            out.extend_from_slice(message);
        } else {
            simple_header(&mut out, errno, req.handle);
        }
        Ok(self.s.write_all(&out)?)
    }
}
