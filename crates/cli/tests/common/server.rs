//! The real `vmvault server` binary, started by a test on an ephemeral loopback port and
//! killed when the test is done with it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{Env, Out, PASS};

/// A started server: where it listens and what it said until then.
pub struct Server {
    pub child: Child,
    /// `https://127.0.0.1:PORT`, or `http://` with `--insecure-http`.
    pub url: String,
    /// Over TLS, the certificate's SHA-256 fingerprint as the server said it; empty over HTTP.
    pub fingerprint: String,
    /// Its log (stderr) up to the line that says where it listens, and the fingerprint's.
    pub log: Vec<String>,
    /// The admin's token as `--token` takes a file: `@STATE/admin-token`.
    pub admin: String,
    state: PathBuf,
}

impl Server {
    /// The server on the test's vault (`VMVAULT_VAULT`) with `extra` arguments: over TLS
    /// unless they have `--insecure-http`. Returns once it has said where it listens.
    pub fn start(env: &Env, extra: &[&str]) -> Server {
        Server::start_with(env, extra, |_| {})
    }

    /// As [`Server::start`], with `adjust` given the command before it runs (other
    /// variables, a vault named by flags instead of `VMVAULT_VAULT`).
    pub fn start_with(env: &Env, extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
        Server::start_on(env, "127.0.0.1:0", extra, adjust)
    }

    /// As [`Server::start_with`], listening on `listen` (a server restarted on the same
    /// state must keep its address: agents pinned it).
    pub fn start_on(
        env: &Env,
        listen: &str,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Server {
        let state = env.path("server");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmvault"));
        cmd.args(["server", "--listen", listen])
            // The test's folder holds the VM's disks and any restore; anything the server
            // makes in its working folder by mistake shows there.
            .arg("--disk-root")
            .arg(env.dir.path())
            .arg("--restore-root")
            .arg(env.dir.path())
            .args(extra)
            .env("VMVAULT_SERVER_STATE", &state)
            .env("VMVAULT_VAULT", &env.vault)
            .env("VMVAULT_PASSWORD", PASS)
            // The own host's agent would ask every QEMU on this machine, other tests' too.
            .env("VMVAULT_SERVER_NO_OWN_HOST", "1")
            .current_dir(env.dir.path())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut url, mut fingerprint, mut log) = (String::new(), String::new(), Vec::new());
        while url.is_empty() || (!url.starts_with("http://") && fingerprint.is_empty()) {
            let Some(Ok(line)) = lines.next() else {
                panic!("the server stopped before listening:\n{}", log.join("\n"));
            };
            if let Some(u) = line.strip_prefix("vmvault server: listening on ") {
                url = u.to_string();
            }
            if let Some(f) = line.strip_prefix("vmvault server: certificate fingerprint (SHA-256) ")
            {
                fingerprint = f.to_string();
            }
            log.push(line);
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Server {
            child,
            url,
            fingerprint,
            log,
            admin: format!("@{}", state.join("admin-token").display()),
            state,
        }
    }

    /// `HOST:PORT`.
    pub fn addr(&self) -> &str {
        let rest = self.url.split_once("://").map_or(&*self.url, |(_, r)| r);
        rest.trim_end_matches('/')
    }

    /// The admin's token itself (the server writes it on its first start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.state.join("admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The CLI against this server with `token` (a token, or `@FILE`).
    pub fn cli(&self, env: &Env, token: &str, args: &[&str]) -> Out {
        let mut all = vec!["--server", &self.url, "--token", token];
        all.extend_from_slice(args);
        env.run(&all)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
