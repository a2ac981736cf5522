//! The server, spoken to by this crate's client and byte by byte: every option and command it
//! supports, the ones it refuses, and clients that break the protocol.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmvault_nbd::proto::*;
use vmvault_nbd::{Client, ConnectOptions, Extent, MemoryExport, NbdError, Server};

const K64: usize = 65536;

/// 1 MiB + 1000 bytes: data in blocks 0, 3 and 16 (a short last block), holes elsewhere.
fn disk() -> Vec<u8> {
    let mut d = vec![0u8; (1 << 20) + 1000];
    for (i, b) in d[..K64].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    d[3 * K64..4 * K64].fill(0x33);
    d[16 * K64 + 10] = 7;
    d
}

fn server() -> Arc<Server> {
    Arc::new(
        Server::new("disk", Arc::new(MemoryExport::new(disk()))).with_description("a test disk"),
    )
}

/// A connected pair: the server serving one end on a thread.
fn connect() -> (UnixStream, std::thread::JoinHandle<Result<(), NbdError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let s = server();
    (a, std::thread::spawn(move || s.serve(b)))
}

fn opts(contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        export: "disk".into(),
        meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
    }
}

#[test]
fn client_reads_holes_and_block_status() {
    let (s, t) = connect();
    let mut c = Client::handshake(s, &opts(&[BASE_ALLOCATION])).unwrap();
    assert_eq!(c.size(), disk().len() as u64);
    assert!(c.read_only());
    let mut all = vec![0xeeu8; disk().len()];
    c.read_at(0, &mut all).unwrap();
    assert!(all == disk());
    let mut some = vec![0u8; 3 * K64 + 7];
    c.read_at(K64 as u64 - 5, &mut some).unwrap();
    assert_eq!(some, disk()[K64 - 5..4 * K64 + 2]);
    let hole = STATE_HOLE | STATE_ZERO;
    let e = |len: usize, flags| Extent {
        len: len as u64,
        flags,
    };
    let status = c.block_status(0, c.size(), BASE_ALLOCATION).unwrap();
    assert_eq!(
        status,
        vec![
            e(K64, 0),
            e(2 * K64, hole),
            e(K64, 0),
            e(12 * K64, hole),
            e(1000, 0)
        ]
    );
    assert_eq!(
        c.block_status(K64 as u64 + 1, 10, BASE_ALLOCATION).unwrap(),
        vec![e(10, hole)]
    );
    // Writes are refused; the connection goes on.
    match c.write_at(10, &[1, 2, 3]) {
        Err(NbdError::Command { errno, message, .. }) => {
            assert_eq!(errno, EPERM);
            assert!(message.contains("read-only"), "{message}");
        }
        r => panic!("a write was not refused: {r:?}"),
    }
    let mut b = [0u8; 3];
    c.read_at(10, &mut b).unwrap();
    assert_eq!(b[..], disk()[10..13]);
    c.disconnect().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn tcp_and_several_clients_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server();
    std::thread::spawn(move || s.serve_tcp(listener));
    let mut clients: Vec<_> = (0..4)
        .map(|_| Client::connect_tcp(addr, &opts(&[])).unwrap())
        .collect();
    for round in 0..3u64 {
        for c in clients.iter_mut() {
            let mut b = [0u8; 100];
            c.read_at(round * 10, &mut b).unwrap();
            assert_eq!(
                b[..],
                disk()[round as usize * 10..round as usize * 10 + 100]
            );
        }
    }
    // The default (empty) export name reaches the one export too.
    let c = Client::connect_tcp(addr, &ConnectOptions::default()).unwrap();
    assert_eq!(c.size(), disk().len() as u64);
}

#[test]
fn connections_past_the_limit_are_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s =
        Arc::new(Server::new("disk", Arc::new(MemoryExport::new(disk()))).with_max_connections(2));
    std::thread::spawn(move || s.serve_tcp(listener));
    let a = Client::connect_tcp(addr, &opts(&[])).unwrap();
    let _b = Client::connect_tcp(addr, &opts(&[])).unwrap();
    assert!(Client::connect_tcp(addr, &opts(&[])).is_err());
    // A slot frees when a client leaves (the server notices asynchronously).
    a.disconnect().unwrap();
    let started = std::time::Instant::now();
    while Client::connect_tcp(addr, &opts(&[])).is_err() {
        assert!(started.elapsed().as_secs() < 10, "the slot was never freed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A raw session: handshake done by hand, so that the test can send anything.
struct Raw(UnixStream);

impl Raw {
    fn new(client_flags: u32) -> Raw {
        let (mut s, _t) = connect();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(hello[..8], NBDMAGIC.to_be_bytes());
        assert_eq!(hello[8..16], IHAVEOPT.to_be_bytes());
        assert_eq!(
            hello[16..],
            (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
        );
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Raw(s)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// (reply type, data)
    fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..12], option.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.0.read_exact(&mut data).unwrap();
        (kind, data)
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            handle: 42,
            offset,
            len,
        };
        self.0.write_all(&r.encode()).unwrap();
    }

    /// A simple reply's error.
    fn simple(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..], 42u64.to_be_bytes());
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }

    /// A structured chunk: (flags, type, payload).
    fn chunk(&mut self) -> (u16, u16, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..16], 42u64.to_be_bytes());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.0.read_exact(&mut data).unwrap();
        let flags = u16::from_be_bytes([h[4], h[5]]);
        (flags, u16::from_be_bytes([h[6], h[7]]), data)
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn options_list_info_abort_and_unknown() {
    let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    r.option(OPT_LIST, &[]);
    let (kind, data) = r.reply(OPT_LIST);
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&data[..4], &4u32.to_be_bytes());
    assert_eq!(&data[4..], b"diska test disk");
    assert_eq!(r.reply(OPT_LIST).0, REP_ACK);
    r.option(OPT_LIST, b"x");
    assert_eq!(r.reply(OPT_LIST).0, REP_ERR_INVALID);
    r.option(
        OPT_INFO,
        &encode_info_request("disk", &[INFO_NAME, INFO_DESCRIPTION]),
    );
    let mut infos = Vec::new();
    loop {
        match r.reply(OPT_INFO) {
            (REP_ACK, _) => break,
            (REP_INFO, d) => infos.push(d),
            (k, _) => panic!("reply {k:#x}"),
        }
    }
    let size = (disk().len() as u64).to_be_bytes();
    let flags =
        (FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN).to_be_bytes();
    assert!(infos.contains(&[&[0, 0][..], &size, &flags].concat()));
    assert!(infos.contains(
        &[
            &[0, 3][..],
            &1u32.to_be_bytes(),
            &4096u32.to_be_bytes(),
            &MAX_REQUEST.to_be_bytes()
        ]
        .concat()
    ));
    assert!(infos.contains(&[&[0, 1][..], b"disk"].concat()));
    assert!(infos.contains(&[&[0, 2][..], b"a test disk"].concat()));
    r.option(OPT_INFO, &encode_info_request("nope", &[]));
    assert_eq!(r.reply(OPT_INFO).0, REP_ERR_UNKNOWN);
    r.option(OPT_GO, &[0, 0, 0, 9]);
    assert_eq!(r.reply(OPT_GO).0, REP_ERR_INVALID);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    r.option(99, b"whatever");
    assert_eq!(r.reply(99).0, REP_ERR_UNSUP);
    // Metadata contexts need structured replies first.
    r.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("disk", &[BASE_ALLOCATION]),
    );
    assert_eq!(r.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    r.option(OPT_LIST_META_CONTEXT, &encode_meta_request("disk", &[]));
    let (kind, data) = r.reply(OPT_LIST_META_CONTEXT);
    assert_eq!(
        (kind, &data[4..]),
        (REP_META_CONTEXT, BASE_ALLOCATION.as_bytes())
    );
    assert_eq!(r.reply(OPT_LIST_META_CONTEXT).0, REP_ACK);
    // Unknown namespaces are ignored, not errors.
    r.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("disk", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.reply(OPT_ABORT).0, REP_ACK);
    assert!(r.closed());
}

#[test]
fn export_name_and_simple_replies() {
    let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE);
    r.option(OPT_EXPORT_NAME, b"disk");
    let mut b = [0u8; 8 + 2 + 124];
    r.0.read_exact(&mut b).unwrap();
    assert_eq!(b[..8], (disk().len() as u64).to_be_bytes());
    assert!(b[10..].iter().all(|&z| z == 0));
    r.request(CMD_READ, 0, 3 * K64 as u64 - 2, 4);
    assert_eq!(r.simple(), 0);
    let mut data = [0u8; 4];
    r.0.read_exact(&mut data).unwrap();
    assert_eq!(data, [0, 0, 0x33, 0x33]);
    // Writes are refused, their payload consumed; the session goes on.
    r.request(CMD_WRITE, 0, 0, 512);
    r.0.write_all(&[9u8; 512]).unwrap();
    assert_eq!(r.simple(), EPERM);
    r.request(CMD_TRIM, 0, 0, 512);
    assert_eq!(r.simple(), EPERM);
    r.request(CMD_FLUSH, 0, 0, 0);
    assert_eq!(r.simple(), 0);
    r.request(CMD_READ, 0, disk().len() as u64 - 1, 2);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_READ, 0, u64::MAX - 1, 4);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_READ, 0, 0, MAX_REQUEST + 1);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_READ, CMD_FLAG_DF, 0, 1);
    assert_eq!(r.simple(), EINVAL, "DF without structured replies");
    r.request(CMD_BLOCK_STATUS, 0, 0, 512);
    assert_eq!(r.simple(), EINVAL);
    r.request(77, 0, 0, 0);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_DISC, 0, 0, 0);
    assert!(r.closed());
}

#[test]
fn structured_reads_hole_chunks_df_and_errors() {
    let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    r.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("disk", &[BASE_ALLOCATION]),
    );
    let (kind, data) = r.reply(OPT_SET_META_CONTEXT);
    assert_eq!(kind, REP_META_CONTEXT);
    let id = data[..4].to_vec();
    assert_eq!(r.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    r.option(OPT_GO, &encode_info_request("disk", &[]));
    while r.reply(OPT_GO).0 != REP_ACK {}
    // Data, hole, data: three chunks, the last marked done.
    r.request(CMD_READ, 0, K64 as u64 - 4, 2 * K64 as u32 + 8);
    let (f, t, p) = r.chunk();
    assert_eq!((f, t, p.len()), (0, REPLY_TYPE_OFFSET_DATA, 8 + 4));
    let (f, t, p) = r.chunk();
    assert_eq!((f, t), (0, REPLY_TYPE_OFFSET_HOLE));
    assert_eq!(
        p,
        [
            &(K64 as u64).to_be_bytes()[..],
            &(2 * K64 as u32).to_be_bytes()
        ]
        .concat()
    );
    let (f, t, p) = r.chunk();
    assert_eq!(
        (f, t, &p[..8]),
        (
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            &(3 * K64 as u64).to_be_bytes()[..]
        )
    );
    assert_eq!(&p[8..], &[0x33; 4]);
    // Don't fragment: one data chunk with the zeros in it.
    r.request(CMD_READ, CMD_FLAG_DF, K64 as u64 - 1, 3);
    let (f, t, p) = r.chunk();
    assert_eq!(
        (f, t, &p[8..]),
        (
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            &[disk()[K64 - 1], 0, 0][..]
        )
    );
    // Errors are error chunks with a message.
    r.request(CMD_WRITE, 0, 0, 1);
    r.0.write_all(&[1]).unwrap();
    let (f, t, p) = r.chunk();
    assert_eq!(
        (f, t, &p[..4]),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &EPERM.to_be_bytes()[..])
    );
    assert!(String::from_utf8_lossy(&p[6..]).contains("read-only"));
    // Block status, and REQ_ONE.
    r.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4 * K64 as u32);
    let (f, t, p) = r.chunk();
    assert_eq!((f, t), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(
        p,
        [&id[..], &(K64 as u32).to_be_bytes(), &0u32.to_be_bytes()].concat()
    );
    r.request(CMD_BLOCK_STATUS, 0, 0, 0);
    assert_eq!(r.chunk().1, REPLY_TYPE_ERROR);
    r.request(CMD_FLUSH, 0, 0, 0);
    assert_eq!(r.chunk(), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![]));
    r.request(CMD_DISC, 0, 0, 0);
    assert!(r.closed());
}

#[test]
fn clients_that_break_the_protocol_are_dropped() {
    // Unknown client flags.
    let mut r = Raw::new(1 << 7);
    assert!(r.closed());
    // An option too large to be honest.
    let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    r.0.write_all(&b).unwrap();
    assert!(r.closed());
    // An unknown export through EXPORT_NAME cannot be answered: the server hangs up.
    let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE);
    r.option(OPT_EXPORT_NAME, b"other");
    assert!(r.closed());
    // A request with a bad magic, and a write too large to skip.
    for bad in [
        [0u8; 28],
        Request {
            flags: 0,
            kind: CMD_WRITE,
            handle: 1,
            offset: 0,
            len: u32::MAX,
        }
        .encode(),
    ] {
        let mut r = Raw::new(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        r.option(OPT_EXPORT_NAME, b"");
        let mut b = [0u8; 10];
        r.0.read_exact(&mut b).unwrap();
        r.0.write_all(&bad).unwrap();
        assert!(r.closed());
    }
    // Garbage instead of a handshake.
    let (mut s, t) = connect();
    s.write_all(&[0xff; 64]).unwrap();
    drop(s);
    assert!(t.join().unwrap().is_err());
}

#[test]
fn a_client_that_vanishes_ends_its_session_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = server();
    let t = std::thread::spawn(move || srv.serve(listener.accept().unwrap().0));
    let mut raw = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 18];
    raw.read_exact(&mut hello).unwrap();
    drop(raw);
    assert!(t.join().unwrap().is_ok());
}
