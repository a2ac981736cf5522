//! A small, typed QMP client: one connection to a running QEMU's monitor socket.
//!
//! QMP is line-delimited JSON: after a greeting, the client sends `{"execute": ..., "id": N}`
//! and reads lines until the one carrying its id (`return` or `error`); lines with an `event`
//! key can arrive at any time, between or before replies, and are kept in order for
//! [`Qmp::take_events`] and [`Qmp::wait_event`]. Every read has a deadline, so a QEMU that stops
//! answering is an error, never a hang.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{QemuError, Result};

/// How long one command may take to answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An asynchronous event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Event>,
    timeout: Duration,
    /// QEMU's version from the greeting, e.g. (7, 2, 22).
    version: (u64, u64, u64),
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|e| QemuError::Io {
            context: format!("connecting to the QMP socket {}", path.display()),
            source: e,
        })?;
        let writer = stream.try_clone().map_err(|e| QemuError::Io {
            context: "cloning the QMP socket".into(),
            source: e,
        })?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            timeout: DEFAULT_TIMEOUT,
            version: (0, 0, 0),
        };
        let greeting = qmp.read_message(Instant::now() + qmp.timeout)?;
        let v = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QemuError::Protocol(format!("not a QMP greeting: {greeting}")))?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = (n("major"), n("minor"), n("micro"));
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// How long each command may take from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs a command; its `return` value, or [`QemuError::Command`] with QEMU's class and text.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("JSON values serialize");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| QemuError::Io {
            context: format!("sending {command}"),
            source: e,
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.read_message(deadline)?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // Replies to nobody (there are none in our use) are dropped.
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let err = reply.get("error").cloned().unwrap_or(Value::Null);
            return Err(QemuError::Command {
                command: command.to_string(),
                class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: err["desc"].as_str().unwrap_or("no description").to_string(),
            });
        }
    }

    /// Every event received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` whose data `matches`, up to `timeout`; events read on
    /// the way are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e.name == name && matches(&e.data))
            {
                return Ok(self.events.remove(i).expect("found"));
            }
            // Events arrive on their own: read one more message (none answers a command).
            let msg = self.read_message(deadline)?;
            if msg.get("event").is_none() {
                continue;
            }
        }
    }

    /// Reads the next message; an event is also kept for [`Qmp::take_events`].
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QemuError::Timeout("QEMU did not answer in time".into()));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| QemuError::Io {
                context: "setting the QMP read timeout".into(),
                source: e,
            })?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(QemuError::Closed),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QemuError::Timeout("QEMU did not answer in time".into()))
            }
            Err(e) => {
                return Err(QemuError::Io {
                    context: "reading from QMP".into(),
                    source: e,
                })
            }
        }
        let msg: Value = serde_json::from_str(&line)
            .map_err(|e| QemuError::Protocol(format!("QMP sent something not JSON: {e}")))?;
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            self.events.push_back(Event {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            });
        }
        Ok(msg)
    }
}
