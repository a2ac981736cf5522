//! The vault's rules hold on object storage as on a directory (issue 12, "Verified by"): soft
//! delete, undelete, prune, gc, the lock and its refusals, through the CLI on a vault in S3
//! (Garage, else moto) and in Azure Blob (Azurite), each step asserting that nothing the
//! rules keep disappears. A server whose tool is missing is a skip, except under scripts/test.

mod common;

use common::{credential_env, make_image, mutate_image, write_vm, Env, Out};
use vmvault_testkit::{Azurite, S3Server};

/// The CLI on one remote vault: its flags and its credentials.
struct Remote<'a> {
    env: &'a Env,
    flags: Vec<String>,
    vars: Vec<(String, String)>,
}

impl Remote<'_> {
    fn run(&self, args: &[&str]) -> Out {
        let mut all: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let mut c = self.env.command(&all);
        c.envs(self.vars.iter().cloned());
        common::out(c.output().unwrap())
    }

    fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, 0, "{args:?}:\n{}\n{}", o.stdout, o.stderr);
        o
    }

    fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        common::assert_error(&o, code, args);
        o.stderr
    }

    fn ids(&self, args: &[&str]) -> Vec<String> {
        let mut all = args.to_vec();
        all.push("--json");
        self.ok(&all).json()["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }
}

fn matrix(r: &Remote, url: &str) {
    let env = r.env;
    r.ok(&["vault", "create", url, "--chunk-size", "64K"]);
    let img = env.path("os.raw");
    make_image(&img, 1 << 20, 50);
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")]);
    let mut ids = Vec::new();
    for round in 0..3 {
        mutate_image(&img, 30.0, 51 + round);
        ids.push(
            r.ok(&["backup", desc.to_str().unwrap()])
                .stdout
                .trim()
                .to_string(),
        );
    }
    let short = |i: usize| format!("web01@{}", &ids[i][..8]);

    // A delete is soft: listed as deleted, restorable by undelete, its chunks kept by gc.
    r.ok(&["point", "delete", &short(0)]);
    assert_eq!(r.ids(&["points"]), ids[1..].to_vec());
    assert_eq!(r.ids(&["points", "--deleted"]), vec![ids[0].clone()]);
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN + std::time::Duration::from_millis(200));
    let g = r.ok(&["gc", "--json"]).json();
    assert_eq!(g["points_purged"], 0, "{g}");
    r.ok(&["point", "undelete", &short(0)]);
    assert_eq!(r.ids(&["points"]).len(), 3);
    r.ok(&["verify", "--read-data"]);

    // Prune deletes softly too.
    let o = r.ok(&["prune", "--keep-last", "2"]);
    assert!(o.stderr.contains("1 deleted"), "{}", o.stderr);
    assert_eq!(r.ids(&["points", "--deleted"]), vec![ids[0].clone()]);
    r.ok(&["point", "undelete", &short(0)]);
    let out = env.path("first.raw");
    r.ok(&[
        "restore",
        &short(0),
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]);

    // Locked: nothing leaves and the window only grows, by any command; gc loses nothing.
    r.ok(&["vault", "lock", "--yes-i-understand-this-is-irreversible"]);
    let e = r.fails(&["point", "delete", &short(1)], 6);
    assert!(e.contains("the vault is locked"), "{e}");
    let o = r.ok(&["prune", "--keep-last", "1"]);
    assert!(
        o.stderr.contains("kept: the vault is locked"),
        "{}",
        o.stderr
    );
    r.fails(&["vault", "set", "--soft-delete-days", "0"], 6);
    r.ok(&["gc"]);
    assert_eq!(r.ids(&["points"]), ids);
    r.ok(&["verify", "--read-data"]);
}

#[test]
fn the_rules_hold_on_s3() {
    let Some(s3) = S3Server::start() else { return };
    let env = Env::new();
    let url = s3.url("rules");
    let r = Remote {
        env: &env,
        flags: vec![
            "--vault".into(),
            url.clone(),
            "--endpoint".into(),
            s3.endpoint(),
            "--region".into(),
            s3.region(),
        ],
        vars: credential_env(&s3.credentials()),
    };
    matrix(&r, &url);
}

#[test]
fn the_rules_hold_on_azure_blob() {
    let Some(az) = Azurite::start() else { return };
    let env = Env::new();
    let url = az.url("rules");
    let r = Remote {
        env: &env,
        flags: vec![
            "--vault".into(),
            url.clone(),
            "--endpoint".into(),
            az.endpoint(),
            "--account".into(),
            az.account(),
        ],
        vars: credential_env(&az.credentials()),
    };
    matrix(&r, &url);
}
