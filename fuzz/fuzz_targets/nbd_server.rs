#![no_main]
//! The NBD server's handshake, options and commands: the input is everything a client sends;
//! whatever the server answers is dropped. It must never panic, hang or allocate more than a
//! request's bounded size.
use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmvault_nbd::{MemoryExport, Server};

struct Client<'a>(&'a [u8]);

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // 256 KiB + 100: data, a hole, data, a short tail.
        let mut disk = vec![0u8; 256 * 1024 + 100];
        disk[..65536].fill(1);
        disk[3 * 65536..].fill(2);
        Server::new("disk", Arc::new(MemoryExport::new(disk)))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = server().serve(Client(data));
});
