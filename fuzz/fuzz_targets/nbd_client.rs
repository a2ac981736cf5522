#![no_main]
//! The NBD client against a hostile server: the input is everything the server sends. The
//! client negotiates, then reads and asks for block status; it must never panic or hang.
//! An odd first byte puts a valid negotiation (two metadata contexts, a 64 KiB export, 4 KiB
//! maximum requests) before the rest of the input, so that the fuzzer spends its time on the
//! replies to commands as well as on the handshake.
use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use vmvault_nbd::proto::*;
use vmvault_nbd::{Client, ConnectOptions};

struct Server<'a>(&'a [u8]);

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn option_reply(b: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
}

fn negotiation() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&NBDMAGIC.to_be_bytes());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    option_reply(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    for (id, name) in [(1u32, "base:allocation"), (2, "qemu:dirty-bitmap:b")] {
        let data = [&id.to_be_bytes()[..], name.as_bytes()].concat();
        option_reply(&mut b, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &data);
    }
    option_reply(&mut b, OPT_SET_META_CONTEXT, REP_ACK, &[]);
    let export = [
        &INFO_EXPORT.to_be_bytes()[..],
        &65536u64.to_be_bytes(),
        &3u16.to_be_bytes(),
    ]
    .concat();
    option_reply(&mut b, OPT_GO, REP_INFO, &export);
    let sizes = [
        &INFO_BLOCK_SIZE.to_be_bytes()[..],
        &1u32.to_be_bytes(),
        &512u32.to_be_bytes(),
        &4096u32.to_be_bytes(),
    ]
    .concat();
    option_reply(&mut b, OPT_GO, REP_INFO, &sizes);
    option_reply(&mut b, OPT_GO, REP_ACK, &[]);
    b
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let data = if mode & 1 == 1 {
        [negotiation(), rest.to_vec()].concat()
    } else {
        rest.to_vec()
    };
    let data = &data[..];
    let opts = ConnectOptions {
        export: "disk".into(),
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
    };
    let Ok(mut c) = Client::handshake(Server(data), &opts) else {
        return;
    };
    let size = c.size();
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    let _ = c.read_at(0, &mut buf);
    let _ = c.block_status(0, size.min(1 << 30), "base:allocation");
    let _ = c.block_status(0, size.min(1 << 30), "qemu:dirty-bitmap:b");
});
