//! What a QEMU command line says about its monitors: the QMP unix sockets it serves, its guest
//! agent's socket and its `-name`. A pure function of argv, because argv is whatever any process
//! on the host put there: it must never panic and never guess a socket QEMU does not listen on.

use std::collections::HashMap;

use serde_json::Value;

/// The guest agent's well-known virtio-serial port name.
const QGA_PORT: &str = "org.qemu.guest_agent.0";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// QMP sockets QEMU listens on, in command-line order; relative ones as written.
    pub qmp: Vec<String>,
    pub qga: Option<String>,
    /// The `-name` guest name.
    pub name: Option<String>,
}

/// A monitor as the command line gives it: `-qmp` names its socket, `-mon` a chardev that may
/// be defined later (QEMU resolves ids only after reading every argument).
enum Monitor {
    Socket(String),
    Chardev(String),
}

/// Parses a QEMU argv (without argv[0]).
pub fn sockets_of(args: &[String]) -> QemuArgs {
    let mut monitors = Vec::new();
    // id -> socket path, only for chardevs QEMU listens on.
    let mut chardevs: HashMap<String, String> = HashMap::new();
    let mut agent_ports = Vec::new();
    let mut name = None;
    let mut i = 0;
    while i < args.len() {
        // QEMU takes `--opt` for `-opt`.
        let opt = args[i].strip_prefix("--").or(args[i].strip_prefix('-'));
        let (Some(opt), Some(value)) = (opt, args.get(i + 1)) else {
            i += 1;
            continue;
        };
        let mut taken = true;
        match opt {
            "qmp" | "qmp-pretty" => {
                let unix = value.strip_prefix("unix:").map(|v| Opts::parse(v, "path"));
                if let Some(path) = unix.as_ref().and_then(listening) {
                    monitors.push(Monitor::Socket(path));
                }
            }
            "chardev" => {
                let o = Opts::parse(value, "backend");
                let abstract_ns = o.get("abstract").is_some_and(on);
                if o.get("backend") == Some("socket") && !abstract_ns {
                    if let (Some(id), Some(path)) = (o.get("id"), listening(&o)) {
                        chardevs.insert(id.to_string(), path);
                    }
                }
            }
            "mon" => {
                let o = Opts::parse(value, "chardev");
                if o.get("mode") == Some("control") {
                    if let Some(id) = o.get("chardev") {
                        monitors.push(Monitor::Chardev(id.to_string()));
                    }
                }
            }
            "device" => {
                if let Some(id) = agent_chardev(value) {
                    agent_ports.push(id);
                }
            }
            "name" => {
                name = Opts::parse(value, "guest")
                    .get("guest")
                    .filter(|n| !n.is_empty())
                    .map(str::to_string);
            }
            _ => taken = false,
        }
        // Unknown options are stepped over one word at a time: their values cannot be told from
        // flags without QEMU's whole option table, and a value never equals `-qmp` in practice.
        i += if taken { 2 } else { 1 };
    }
    let qmp = monitors
        .into_iter()
        .filter_map(|m| match m {
            Monitor::Socket(path) => Some(path),
            Monitor::Chardev(id) => chardevs.get(&id).cloned(),
        })
        .collect();
    let qga = agent_ports.iter().find_map(|id| chardevs.get(id)).cloned();
    QemuArgs { qmp, qga, name }
}

/// The socket path of a unix socket chardev QEMU is the server of; a client-side one (no
/// `server`) is someone else's socket, and `fd=` (libvirt) has no path at all.
fn listening(o: &Opts) -> Option<String> {
    let path = o.get("path").filter(|p| !p.is_empty())?;
    o.get("server").is_some_and(on).then(|| path.to_string())
}

/// The chardev id of a `virtserialport` device that is the guest agent's port, in either the
/// `driver,key=value` or the JSON form of `-device`.
fn agent_chardev(spec: &str) -> Option<String> {
    if spec.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(spec).ok()?;
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        return (field("driver") == Some("virtserialport") && field("name") == Some(QGA_PORT))
            .then(|| field("chardev").map(str::to_string))
            .flatten();
    }
    let o = Opts::parse(spec, "driver");
    (o.get("driver") == Some("virtserialport") && o.get("name") == Some(QGA_PORT))
        .then(|| o.get("chardev").map(str::to_string))
        .flatten()
}

/// QEMU's boolean words.
fn on(v: &str) -> bool {
    matches!(v, "on" | "yes" | "true" | "y")
}

/// A QemuOpts string: `a=1,b,nofoo` with `,,` for a comma inside a value; a first element
/// without `=` is the value of the option's implied key.
struct Opts(Vec<(String, String)>);

impl Opts {
    fn parse(s: &str, implied: &str) -> Opts {
        let mut out = Vec::new();
        for (n, part) in split_commas(s).into_iter().enumerate() {
            if let Some((k, v)) = part.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            } else if n == 0 && !implied.is_empty() {
                out.push((implied.to_string(), part));
            } else if let Some(k) = part.strip_prefix("no") {
                // `nowait`: the old spelling of `wait=off`.
                out.push((k.to_string(), "off".to_string()));
            } else {
                out.push((part, "on".to_string()));
            }
        }
        Opts(out)
    }

    /// The last value given for `key`, as QEMU keeps it.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn split_commas(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            parts.last_mut().expect("never empty").push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            parts.last_mut().expect("never empty").push(',');
        } else {
            parts.push(String::new());
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(args: &[&str]) -> QemuArgs {
        sockets_of(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn qmp(args: &[&str]) -> Vec<String> {
        parse(args).qmp
    }

    #[test]
    fn every_qmp_spelling_gives_its_path() {
        assert_eq!(
            qmp(&["-qmp", "unix:/r/a.sock,server=on,wait=off"]),
            ["/r/a.sock"]
        );
        assert_eq!(
            qmp(&["-qmp", "unix:/r/a.sock,server,nowait"]),
            ["/r/a.sock"]
        );
        assert_eq!(
            qmp(&["-qmp", "unix:path=/r/a.sock,server=on"]),
            ["/r/a.sock"]
        );
        assert_eq!(
            qmp(&["-qmp-pretty", "unix:/r/p.sock,server=yes"]),
            ["/r/p.sock"]
        );
        assert_eq!(qmp(&["--qmp", "unix:/r/d.sock,server=on"]), ["/r/d.sock"]);
        assert_eq!(qmp(&["-qmp", "unix:rel/q.sock,server=on"]), ["rel/q.sock"]);
        assert_eq!(
            qmp(&["-qmp", "unix:/r/a,,b.sock,server=on"]),
            ["/r/a,b.sock"]
        );
        assert_eq!(
            qmp(&[
                "-S",
                "-qmp",
                "unix:/1,server",
                "-m",
                "1G",
                "-qmp",
                "unix:/2,server"
            ]),
            ["/1", "/2"]
        );
    }

    #[test]
    fn sockets_qemu_does_not_listen_on_are_left_out() {
        // Without `server` QEMU connects out to someone else's socket.
        assert!(qmp(&["-qmp", "unix:/r/a.sock"]).is_empty());
        assert!(qmp(&["-qmp", "unix:/r/a.sock,server=off"]).is_empty());
        assert!(qmp(&["-qmp", "unix:/r/a.sock,noserver"]).is_empty());
        assert!(qmp(&["-qmp", "tcp:127.0.0.1:4444,server=on"]).is_empty());
        assert!(qmp(&["-qmp", "stdio"]).is_empty());
        assert!(qmp(&["-qmp", "unix:,server=on"]).is_empty());
        assert!(qmp(&["-qmp"]).is_empty());
    }

    #[test]
    fn a_control_monitor_on_a_socket_chardev_is_a_qmp_socket() {
        let args = [
            "-mon",
            "chardev=m0,mode=control,pretty=on",
            "-chardev",
            "socket,id=m0,path=/r/m0.sock,server=on,wait=off",
            "--chardev",
            "socket,id=m1,path=/r/m1.sock,server=on",
            "-mon",
            "m1,mode=control",
        ];
        assert_eq!(qmp(&args), ["/r/m0.sock", "/r/m1.sock"]);
        // HMP (the default mode), a client chardev, libvirt's inherited fd, an abstract socket.
        let not = [
            "-chardev",
            "socket,id=h,path=/r/h.sock,server=on",
            "-mon",
            "chardev=h",
            "-chardev",
            "socket,id=c,path=/r/c.sock",
            "-mon",
            "chardev=c,mode=control",
            "-chardev",
            "socket,id=f,fd=33,server=on,wait=off",
            "-mon",
            "chardev=f,mode=control",
            "-chardev",
            "socket,id=a,path=x,abstract=on,server=on",
            "-mon",
            "chardev=a,mode=control",
            "-mon",
            "chardev=undefined,mode=control",
        ];
        assert!(qmp(&not).is_empty());
    }

    #[test]
    fn the_guest_agent_port_names_its_chardev_socket() {
        let args = [
            "-chardev",
            "socket,id=qga0,path=/r/qga.sock,server=on,wait=off",
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ];
        assert_eq!(parse(&args).qga.as_deref(), Some("/r/qga.sock"));
        let json = [
            "-device",
            r#"{"driver":"virtserialport","chardev":"qga1","name":"org.qemu.guest_agent.0"}"#,
            "-chardev",
            "socket,id=qga1,path=/r/j.sock,server=on",
        ];
        assert_eq!(parse(&json).qga.as_deref(), Some("/r/j.sock"));
        let other_port = [
            "-chardev",
            "socket,id=p,path=/r/p.sock,server=on",
            "-device",
            "virtserialport,chardev=p,name=com.example.0",
        ];
        assert_eq!(parse(&other_port).qga, None);
        // The agent's socket is not a monitor.
        assert!(parse(&args).qmp.is_empty());
    }

    #[test]
    fn the_name_is_the_guest_name_in_either_form() {
        assert_eq!(parse(&["-name", "web01"]).name.as_deref(), Some("web01"));
        let long = ["-name", "guest=web01,debug-threads=on"];
        assert_eq!(parse(&long).name.as_deref(), Some("web01"));
        let first = ["-name", "db,process=qemu-db"];
        assert_eq!(parse(&first).name.as_deref(), Some("db"));
        assert_eq!(parse(&["-name", ""]).name, None);
        assert_eq!(parse(&["-name"]).name, None);
        assert_eq!(parse(&["web01"]).name, None);
    }

    #[test]
    fn an_option_value_is_not_read_as_an_option() {
        // The value of -name is "-qmp": what follows is a word, not a monitor.
        let args = ["-name", "-qmp", "unix:/r/a.sock,server=on"];
        assert_eq!(parse(&args).name.as_deref(), Some("-qmp"));
        assert!(parse(&args).qmp.is_empty());
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "-qmp",
                "--qmp",
                "-qmp-pretty",
                "-chardev",
                "-mon",
                "-device",
                "-name",
                "-",
                "--",
                "unix:",
                ",",
                ",,",
                "=",
                "server",
                "{",
                "socket,id=a",
                "mode=control",
            ])
            .prop_map(str::to_string),
            "[-a-z:=,{}\"/.]{0,24}",
            any::<String>(),
        ]
    }

    proptest! {
        #[test]
        fn any_argv_parses_without_panicking(args in prop::collection::vec(word(), 0..24)) {
            let _ = sockets_of(&args);
        }

        #[test]
        fn any_path_comes_back_whole(path in "[^\0]{1,40}") {
            let escaped = path.replace(',', ",,");
            let spec = format!("unix:path={escaped},server=on,wait=off");
            prop_assert_eq!(sockets_of(&["-qmp".to_string(), spec]).qmp, vec![path.clone()]);
            // The short form reads a first word with `=` as a key, as QEMU does.
            if !path.contains('=') {
                let spec = format!("unix:{escaped},server,nowait");
                prop_assert_eq!(sockets_of(&["-qmp".to_string(), spec]).qmp, vec![path]);
            }
        }
    }
}
