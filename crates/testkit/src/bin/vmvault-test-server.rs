//! Starts one of the test servers for a program outside Rust (the benchmark) and keeps it
//! running until its standard input closes.
//!
//! ```text
//! vmvault-test-server garage|moto|azurite
//! ```
//! Prints one line of JSON: the vault URL to use (under a fresh prefix is the caller's
//! business), the `vmvault` options that reach it, and the environment that holds its
//! credentials. These are throwaway credentials of a server on 127.0.0.1.

use std::io::Read;

use vmvault_cloud::Credentials;

fn credential_env(c: &Credentials) -> serde_json::Value {
    match c {
        Credentials::S3 {
            access_key_id,
            secret_access_key,
            ..
        } => serde_json::json!({
            "AWS_ACCESS_KEY_ID": access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key,
        }),
        Credentials::AzureKey { key } => serde_json::json!({ "AZURE_STORAGE_KEY": key }),
        Credentials::AzureSas { token } => serde_json::json!({ "AZURE_STORAGE_SAS_TOKEN": token }),
    }
}

fn main() {
    let kind = std::env::args().nth(1).unwrap_or_default();
    // Each arm holds its server until the end of `main`.
    let (info, _server): (serde_json::Value, Box<dyn std::any::Any>) = match kind.as_str() {
        "garage" => {
            let s = vmvault_testkit::Garage::start().unwrap_or_else(|| std::process::exit(3));
            let info = serde_json::json!({
                "url": s.url(""),
                "options": ["--endpoint", s.endpoint(), "--region", s.region()],
                "env": credential_env(&s.credentials()),
            });
            (info, Box::new(s))
        }
        "moto" => {
            let s = vmvault_testkit::Moto::start().unwrap_or_else(|| std::process::exit(3));
            let info = serde_json::json!({
                "url": s.url(""),
                "options": ["--endpoint", s.endpoint(), "--region", s.region()],
                "env": credential_env(&s.credentials()),
            });
            (info, Box::new(s))
        }
        "azurite" => {
            let s = vmvault_testkit::Azurite::start().unwrap_or_else(|| std::process::exit(3));
            let info = serde_json::json!({
                "url": s.url(""),
                "options": ["--endpoint", s.endpoint(), "--account", s.account()],
                "env": credential_env(&s.credentials()),
            });
            (info, Box::new(s))
        }
        _ => {
            eprintln!("usage: vmvault-test-server garage|moto|azurite");
            std::process::exit(2);
        }
    };
    println!("{info}");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}
