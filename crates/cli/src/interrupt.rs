//! Ctrl-C (SIGINT) and SIGTERM during a local command. The first asks the work to stop: the
//! vault's regions are opened through [`vmvault_store::Cancellable`] with this flag, so every
//! further read and write fails and the engine's failure paths undo what they started (a
//! backup writes no recovery point, a restore removes the disks it made). The command then
//! ends with one line saying so and exit code 130. Work that touches no storage for a while
//! (reading a large unchanged disk) is ended after [`GRACE`] anyway, with a line saying what
//! that leaves; a second signal ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

/// How long the work has to stop by itself after the first signal.
const GRACE: Duration = Duration::from_secs(10);

/// What the vault's operations fail with once interrupted.
pub const WHY: &str = "interrupted (Ctrl-C): stopped before the end, and nothing unfinished was \
                       kept (a backup makes its recovery point only when it completes)";

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The flag the vault's regions watch: set by the first signal.
pub fn flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Installs the handlers; without them (a failure to install) the default action stays.
pub fn install() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    let flag = flag();
    std::thread::spawn(move || {
        let mut first = true;
        for _ in signals.forever() {
            if !first {
                eprintln!("\nvmvault: interrupted again: stopped at once");
                std::process::exit(vmvault_class::Class::Cancelled.exit_code());
            }
            first = false;
            flag.store(true, Ordering::SeqCst);
            std::thread::spawn(|| {
                std::thread::sleep(GRACE);
                eprintln!(
                    "\nvmvault: interrupted (Ctrl-C): the work did not stop within {} s and \
                     was ended; a backup that did not complete made no recovery point",
                    GRACE.as_secs()
                );
                std::process::exit(vmvault_class::Class::Cancelled.exit_code());
            });
        }
    });
}
