//! The server commands for hypervisor hosts and the VMs their agents found (docs/design.md,
//! "Host agents"): `host add|remove`, `hosts`, `vms`, `protect HOST/VM` and the HOST/VM form
//! of `backup`. A VM an agent found is named `HOST/VM`; its protected item, and so its
//! recovery points, are named after the VM alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use vmvault_api::hosts::{host_path, protect_vm_path, HOSTS, VMS};
use vmvault_api::path::with_query;
use vmvault_api::{
    items, AddHostRequest, EnrollmentCode, Host, Item, ProtectRequest, ProtectVmRequest, Vm,
    VmQuery,
};
use vmvault_format::valid_name;

use crate::exit::InputError;
use crate::output::{bytes, table};
use crate::remote::{route, Client};
use crate::remote_show::{cell, emit};

#[derive(Subcommand)]
pub enum HostCommand {
    /// Make a one-time enrollment code for a host: prints the code, when it expires, and the
    /// command to run on the host (`vmvault agent enroll ...`).
    Add {
        /// The host's name, as its VMs will be named (HOST/VM).
        name: String,
        /// How long the code enrolls: 30m, 1h (the default), 7d; 5 minutes to 7 days.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// The host has enrolled already: its old key is revoked when the new one enrolls.
        #[arg(long)]
        replace: bool,
    },
    /// Revoke a host's key at once and cancel its running jobs (its VMs' protected items
    /// and recovery points stay).
    Remove { name: String },
    /// Have a host's agent run a release (the newest for its target unless --version): it
    /// upgrades once no job runs, and rolls back a version that does not report in healthy.
    Upgrade {
        /// The host; or --all.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every enrolled host (except the server's own, upgraded with the server).
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
    /// A host's settings.
    Set {
        name: String,
        /// Upgrade to each newest release by itself.
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        auto_upgrade: bool,
    },
}

/// `HOST/VM`, when `s` is exactly two names joined by one `/`.
pub fn host_vm(s: &str) -> Option<(&str, &str)> {
    let (host, vm) = s.split_once('/')?;
    (valid_name(host) && valid_name(vm)).then_some((host, vm))
}

/// What `protect` was given.
#[derive(Debug, PartialEq)]
enum Target {
    /// A VM description file: its disks are on the server's host.
    Description(PathBuf),
    /// A VM a host's agent found.
    Found { host: String, vm: String },
}

/// Reads `protect`'s argument. An existing file, or a name ending in `.toml`, is a
/// description (as before hosts existed); any other `HOST/VM` is a found VM; `--host` makes
/// the argument a VM's name whatever files there are, so every VM can be named.
fn target(arg: &str, host: Option<&str>, is_file: impl Fn(&Path) -> bool) -> Result<Target> {
    if let Some(host) = host {
        if !valid_name(host) || !valid_name(arg) {
            return Err(InputError(format!(
                "--host {host} {arg}: give the host's and the VM's names ({})",
                vmvault_format::NAME_RULE
            ))
            .into());
        }
        return Ok(Target::Found {
            host: host.to_string(),
            vm: arg.to_string(),
        });
    }
    let file = is_file(Path::new(arg));
    if file || arg.ends_with(".toml") {
        if let (true, Some((h, v))) = (file, host_vm(arg)) {
            eprintln!(
                "vmvault: {arg} is a file here: protecting the VM it describes (for the VM \
                 {v} on host {h}, give `--host {h} {v}`)"
            );
        }
        return Ok(Target::Description(PathBuf::from(arg)));
    }
    if let Some((h, v)) = host_vm(arg) {
        return Ok(Target::Found {
            host: h.to_string(),
            vm: v.to_string(),
        });
    }
    Err(InputError(format!(
        "{arg} is neither a VM description file nor HOST/VM (a VM a host's agent found; \
         `vmvault vms` lists them)"
    ))
    .into())
}

pub fn protect(
    c: &Client,
    json: bool,
    arg: &str,
    host: Option<&str>,
    policy: String,
    scripts: Option<PathBuf>,
) -> Result<()> {
    let (item, shown): (Item, String) = match target(arg, host, Path::is_file)? {
        Target::Description(path) => {
            if scripts.is_some() {
                return Err(InputError(format!(
                    "--scripts goes with HOST/VM; the description {} names its own scripts \
                     file (scripts = \"...\")",
                    path.display()
                ))
                .into());
            }
            let mut desc = vmvault_engine::VmDescription::load(&path)?;
            // Paths go to the server absolute: it reads the disks on its own host.
            for d in &mut desc.disks {
                d.path = std::path::absolute(&d.path)
                    .with_context(|| format!("resolving {}", d.path.display()))?;
            }
            let req = ProtectRequest {
                description: desc.to_toml(),
                policy,
            };
            let item: Item = c.send("POST", items::COLLECTION, &req)?;
            let name = item.name.clone();
            (item, name)
        }
        Target::Found { host, vm } => {
            let scripts = match scripts {
                Some(file) => {
                    // Checked here so that the error names the file; the server checks again.
                    vmvault_qemu::Scripts::load(&file).map_err(|e| InputError(e.to_string()))?;
                    Some(
                        std::fs::read_to_string(&file)
                            .with_context(|| format!("reading {}", file.display()))?,
                    )
                }
                None => None,
            };
            let req = ProtectVmRequest { policy, scripts };
            let item: Item = c.send("POST", &route(protect_vm_path(&host, &vm))?, &req)?;
            (item, format!("{host}/{vm}"))
        }
    };
    emit(json, &item, |i| {
        outln!("{shown} is protected by policy {}", i.policy);
    });
    Ok(())
}

/// What the server says when a name is not there: the same class as its own 404.
fn not_found(message: String) -> anyhow::Error {
    vmvault_server::Error::NotFound(message).into()
}

/// The protected item a `backup` argument means: a name as it is, or for `HOST/VM` the item
/// backing up that very VM. The item is named after the VM alone, so without this check
/// `backup kvm02/web01` could back up another host's web01.
pub fn backup_item(c: &Client, arg: &str) -> Result<String> {
    let Some((host, vm)) = host_vm(arg) else {
        return Ok(arg.to_string());
    };
    let found = host_vms(c, host)?.into_iter().find(|v| v.name == vm);
    let Some(found) = found else {
        return Err(not_found(format!(
            "host '{host}' has reported no VM '{vm}' (`vmvault vms --host {host}`)"
        )));
    };
    found.protected.ok_or_else(|| {
        not_found(format!(
            "{host}/{vm} is not protected: `vmvault protect {host}/{vm} --policy NAME` first"
        ))
    })
}

/// The VMs of one host; a host the server does not know is said so, not shown as no VMs.
fn host_vms(c: &Client, host: &str) -> Result<Vec<Vm>> {
    let q = VmQuery {
        host: Some(host.to_string()),
    };
    let vms: Vec<Vm> = c.get(&route(with_query(VMS, &q))?)?;
    if vms.is_empty() {
        let hosts: Vec<Host> = c.get(HOSTS)?;
        if !hosts.iter().any(|h| h.name == host) {
            let known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            return Err(not_found(format!(
                "no host '{host}'{}",
                if known.is_empty() {
                    " (`vmvault host add NAME` adds one)".to_string()
                } else {
                    format!(" (its hosts: {})", known.join(", "))
                }
            )));
        }
    }
    // Only this host's, whatever the answer holds: a VM of another host is never shown as
    // this one's.
    Ok(vms.into_iter().filter(|v| v.host == host).collect())
}

pub fn host(c: &Client, server: &str, json: bool, cmd: HostCommand) -> Result<()> {
    match cmd {
        HostCommand::Add {
            name,
            expires,
            replace,
        } => {
            let req = AddHostRequest {
                name,
                expires,
                replace,
            };
            let code: EnrollmentCode = c.send("POST", HOSTS, &req)?;
            emit(json, &code, |code| print_code(server, code));
        }
        HostCommand::Upgrade { name, all, version } => {
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => {
                    let all: Vec<Host> = c.get(HOSTS)?;
                    all.into_iter()
                        .filter(|h| h.state == vmvault_api::HostState::Enrolled)
                        .map(|h| h.name)
                        .collect()
                }
            };
            let mut done = Vec::new();
            for n in names {
                let req = vmvault_api::UpgradeRequest {
                    version: version.clone(),
                };
                let path = route(vmvault_api::releases::upgrade_path(&n))?;
                match c.send::<Host>("POST", &path, &req) {
                    Ok(h) => done.push(h),
                    // --all skips the server's own host (and others that refuse), saying why.
                    Err(e) if all => eprintln!("vmvault: {n}: {e:#}"),
                    Err(e) => return Err(e),
                }
            }
            emit(json, &done, |d| {
                for h in d {
                    outln!(
                        "{}: to run {} (now {})",
                        h.name,
                        h.wanted_version.as_deref().unwrap_or("-"),
                        h.agent_version.as_deref().unwrap_or("-")
                    );
                }
            });
        }
        HostCommand::Set { name, auto_upgrade } => {
            let req = vmvault_api::HostSettings {
                auto_upgrade: Some(auto_upgrade),
            };
            let h: Host = c.send(
                "PATCH",
                &route(vmvault_api::releases::settings_path(&name))?,
                &req,
            )?;
            emit(json, &h, |h| {
                outln!("{}: auto_upgrade {}", h.name, h.auto_upgrade)
            });
        }
        HostCommand::Remove { name } => {
            let () = c.delete(&route(host_path(&name))?)?;
            eprintln!(
                "host {name} removed: its key is refused from now on; its VMs' protected \
                 items and recovery points stay"
            );
        }
    }
    Ok(())
}

fn print_code(server: &str, code: &EnrollmentCode) {
    let server = server.trim_end_matches('/');
    let mut command = format!("vmvault agent enroll {server} --code {}", code.code);
    if let Some(fp) = &code.fingerprint {
        command.push_str(&format!(" --trust-fingerprint {fp}"));
    }
    outln!("code     {}", code.code);
    outln!("expires  {}", code.expires);
    outln!("on {}, run once:", code.host);
    outln!("  {command}");
    eprintln!("vmvault: the code is shown this once; it enrolls one agent");
    if code.fingerprint.is_none() {
        eprintln!(
            "vmvault: this server runs plain HTTP, and agents talk TLS only: start it with TLS \
             for its agents"
        );
    }
    let host = server.split_once("://").map_or(server, |(_, r)| r);
    if ["127.", "localhost", "[::1]"]
        .iter()
        .any(|l| host.starts_with(l))
    {
        eprintln!(
            "vmvault: {server} is this machine's loopback address: on another host, use an \
             address of the server that host reaches"
        );
    }
}

pub fn hosts(c: &Client, json: bool) -> Result<()> {
    let list: Vec<Host> = c.get(HOSTS)?;
    emit(json, &list, |l| {
        let rows: Vec<Vec<String>> = l
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    h.state.to_string(),
                    cell(&h.agent_version),
                    cell(&h.last_heartbeat),
                    h.vms.to_string(),
                    yes_no(h.silent),
                ]
            })
            .collect();
        table(
            &[
                "HOST",
                "STATE",
                "VERSION",
                "LAST HEARTBEAT",
                "VMS",
                "SILENT",
            ],
            &rows,
        );
    });
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub fn vms(c: &Client, json: bool, host: Option<&str>) -> Result<()> {
    let list: Vec<Vm> = match host {
        Some(h) => host_vms(c, h)?,
        None => c.get(VMS)?,
    };
    emit(json, &list, |l| {
        let rows: Vec<Vec<String>> = l
            .iter()
            .map(|v| {
                let disks: Vec<String> = v
                    .disks
                    .iter()
                    .map(|d| format!("{} {}", d.name, bytes(d.size)))
                    .collect();
                vec![
                    format!("{}/{}", v.host, v.name),
                    v.state.to_string(),
                    // The item is named after the VM: its policy is what tells more.
                    v.protected
                        .as_ref()
                        .and(v.policy.clone())
                        .unwrap_or_else(|| "-".into()),
                    if disks.is_empty() {
                        "-".into()
                    } else {
                        disks.join(", ")
                    },
                    yes_no(v.guest_agent),
                ]
            })
            .collect();
        table(
            &["HOST/VM", "STATE", "POLICY", "DISKS", "GUEST AGENT"],
            &rows,
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(arg: &str, host: Option<&str>, files: &[&str]) -> Result<Target> {
        target(arg, host, |p| files.iter().any(|f| Path::new(f) == p))
    }

    fn found(host: &str, vm: &str) -> Target {
        Target::Found {
            host: host.into(),
            vm: vm.into(),
        }
    }

    #[test]
    fn descriptions_keep_working_and_host_slash_vm_names_a_found_vm() {
        let d = |p: &str| Target::Description(PathBuf::from(p));
        assert_eq!(read("web01.toml", None, &[]).unwrap(), d("web01.toml"));
        assert_eq!(
            read("/etc/vm/web01.toml", None, &[]).unwrap(),
            d("/etc/vm/web01.toml")
        );
        assert_eq!(
            read("vms/web01", None, &["vms/web01"]).unwrap(),
            d("vms/web01")
        );
        assert_eq!(read("web01", None, &["web01"]).unwrap(), d("web01"));
        assert_eq!(
            read("kvm02/web01", None, &[]).unwrap(),
            found("kvm02", "web01")
        );
        // --host names the VM even where a file of that name exists.
        assert_eq!(
            read("web01", Some("kvm02"), &["web01"]).unwrap(),
            found("kvm02", "web01")
        );
    }

    #[test]
    fn what_is_neither_is_refused() {
        for bad in ["a/b/c", "kvm02/", "/web01", "kvm02/.hidden", "web01"] {
            let e = read(bad, None, &[]).unwrap_err();
            assert_eq!(crate::exit::class(&e), vmvault_class::Class::Input, "{bad}");
        }
        assert!(read("kvm02/web01", Some("kvm02"), &[]).is_err());
        assert!(read("web01", Some("-x"), &[]).is_err());
    }

    #[test]
    fn host_vm_is_two_names_and_one_slash() {
        assert_eq!(host_vm("kvm02/web01"), Some(("kvm02", "web01")));
        assert_eq!(host_vm("web01"), None);
        assert_eq!(host_vm("./web01"), None);
        assert_eq!(host_vm("a/b/c"), None);
        assert_eq!(host_vm("../x"), None);
    }
}
