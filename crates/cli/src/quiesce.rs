//! `vmvault quiesce-child`: the hidden helper process that quiesces a guest for a backup
//! (`vmvault_qemu::quiesce`, docs/design.md "Quiesce"). vmvault starts it by re-executing
//! itself; the options (the guest agent's socket, the scripts, the freeze limit) come as the
//! first JSON line on stdin, not as arguments, so the scripts' arguments stay out of `ps`.
//!
//! It is intercepted before the normal command line is parsed, so the subcommand appears in
//! no help text and needs no global options (no vault, no passphrase).

use std::io::BufReader;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

/// The subcommand's name, for the parent's `Command`.
pub const SUBCOMMAND: &str = "quiesce-child";

/// The helper that freezes and thaws a guest through its agent (internal: started by vmvault).
#[derive(Parser)]
#[command(name = "vmvault quiesce-child", hide = true)]
struct ChildArgs {}

/// Runs the helper and exits when the command line asks for it; returns otherwise.
pub fn intercept() {
    let mut args = std::env::args_os();
    if args.nth(1).is_none_or(|a| a != SUBCOMMAND) {
        return;
    }
    let _args = ChildArgs::parse_from(std::env::args_os().skip(1));
    // A Ctrl-C or a hang-up meant for vmvault must not end the helper before it thaws (it is
    // in its own process group, but a signal can still be sent to it by hand): it notes them
    // and goes on; vmvault's death reaches it as the end of its stdin.
    let noted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&noted));
    }
    let code = vmvault_qemu::child_main(BufReader::new(std::io::stdin()), std::io::stdout());
    std::process::exit(code);
}

/// The command that starts the helper: this very binary with the hidden subcommand.
pub fn helper_command() -> std::io::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg(SUBCOMMAND);
    Ok(cmd)
}
