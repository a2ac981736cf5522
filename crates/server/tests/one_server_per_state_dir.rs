//! Two servers on one state directory would both schedule every policy: each backup twice,
//! retention twice, two writers of one catalog. The second start must fail, naming the first,
//! before it touches anything.

mod common;

use std::sync::Arc;

use common::Server;
use vmvault_server::{App, Error, SystemClock};

#[test]
fn a_second_server_on_the_same_state_directory_is_refused() {
    let s = Server::start(Arc::new(SystemClock));
    let second = App::open(s.app.cfg.clone(), Arc::new(SystemClock), &|_| {});
    let err = match second {
        Ok(_) => panic!("a second server opened the same state directory"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}: should name the running server"
    );
    assert!(msg.contains("one server per state directory"), "{msg}");
    // The running server is untouched and still answers.
    let a = s.call(Some(&s.admin), "GET", "/api/v1/vaults", None);
    assert_eq!(a.status, 200, "{}", a.body);
}
