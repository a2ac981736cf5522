//! Garage, the distributed S3 server: one node, or a cluster with one zone per node.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmvault_cloud::{Credentials, RemoteOptions};

use crate::process::{free_port, Process};
use crate::{find_tool, home, missing, s3_options, DEFAULT_BUCKET, STARTUP};

const REGION: &str = "garage";
const INSTALL: &str = "cargo install garage --locked (builds in about 18 minutes, once)";

/// `VMVAULT_GARAGE`, else `~/.cargo/bin/garage`, else `garage` on `PATH`.
pub(crate) fn garage_exe() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("VMVAULT_GARAGE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(home().join(".cargo/bin/garage"));
    find_tool("garage", &candidates)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn cli(exe: &Path, config: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(exe)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .map_err(|e| format!("running garage: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "garage {}: {}\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One Garage node: its config, data and log in `dir`.
struct Node {
    name: String,
    exe: PathBuf,
    dir: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    process: Option<Process>,
}

impl Node {
    fn new(exe: &Path, dir: PathBuf, name: &str, replication: usize, rpc_secret: &str) -> Node {
        std::fs::create_dir_all(&dir).expect("creating a node directory");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = {replication}
compression_level = "none"
block_size = "4M"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
            dir = dir.display()
        );
        std::fs::write(dir.join("garage.toml"), config).expect("writing garage.toml");
        Node {
            name: name.to_string(),
            exe: exe.to_path_buf(),
            dir,
            s3_port,
            rpc_port,
            process: None,
        }
    }

    fn start(&mut self) {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("-c")
            .arg(self.dir.join("garage.toml"))
            .arg("server");
        let mut process = Process::spawn(&self.name, cmd, &self.dir);
        process.wait_for_port(self.rpc_port, STARTUP);
        process.wait_for_port(self.s3_port, STARTUP);
        self.process = Some(process);
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Runs `garage -c CONFIG ARGS`; its stdout, or its output as the error.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        cli(&self.exe, &self.dir.join("garage.toml"), args)
    }

    /// `cli`, panicking with the node's log on failure.
    fn must(&self, args: &[&str]) -> String {
        self.cli(args).unwrap_or_else(|e| self.fail(&e))
    }

    fn fail(&self, msg: &str) -> ! {
        match &self.process {
            Some(p) => p.fail(msg),
            None => panic!("{}: {msg}", self.name),
        }
    }

    /// The full node id (the first line of `node id` is `ID@ADDRESS`).
    fn id(&self) -> String {
        let out = self.must(&["node", "id"]);
        let first = out.lines().next().unwrap_or_default();
        match first.split_once('@') {
            Some((id, _)) => id.trim().to_string(),
            None => self.fail(&format!("unexpected `node id` output: {out}")),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Waits until this node is connected to `up` storage nodes (itself included) and every
    /// partition has a quorum: a restarted node takes a moment to reconnect to each peer.
    fn wait_healthy(&mut self, up: usize) {
        let (exe, config) = (self.exe.clone(), self.dir.join("garage.toml"));
        let process = self.process.as_mut().expect("a started node");
        process.wait_until("a healthy cluster", STARTUP, || {
            let health = cli(&exe, &config, &["json-api", "GetClusterHealth"])?;
            let connected = json_number(&health, "connectedNodes");
            let storage_up = json_number(&health, "storageNodesUp");
            let (partitions, quorum) = (
                json_number(&health, "partitions"),
                json_number(&health, "partitionsQuorum"),
            );
            if connected >= Some(up) && storage_up >= Some(up) && quorum == partitions {
                Ok(())
            } else {
                Err(health)
            }
        });
    }
}

/// The number after `"KEY":` in a flat JSON object.
fn json_number(json: &str, key: &str) -> Option<usize> {
    let marker = format!("\"{key}\":");
    let at = json.find(&marker)? + marker.len();
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Lays out `nodes` (one zone each), imports a key and creates the default bucket.
fn set_up(nodes: &mut [Node]) -> (String, String) {
    let ids: Vec<String> = nodes.iter().map(Node::id).collect();
    connect_all(nodes.iter().collect());
    for (i, id) in ids.iter().enumerate() {
        let zone = format!("dc{}", i + 1);
        nodes[0].must(&["layout", "assign", "-z", &zone, "-c", "1G", id]);
    }
    nodes[0].must(&["layout", "apply", "--version", "1"]);
    let up = nodes.len();
    for node in nodes.iter_mut() {
        node.wait_healthy(up);
    }
    let key_id = format!("GK{}", random_hex(12));
    let secret = random_hex(32);
    nodes[0].must(&["key", "import", "--yes", "-n", "vmvault", &key_id, &secret]);
    (key_id, secret)
}

/// Connects every pair of `nodes` now. Connections are each node's own, and a node looks for
/// peers it has not reached (or lost) only every half minute or so.
fn connect_all(nodes: Vec<&Node>) {
    let peers: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}@127.0.0.1:{}", n.id(), n.rpc_port))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        for (_, peer) in peers.iter().enumerate().filter(|(j, _)| *j != i) {
            node.must(&["node", "connect", peer]);
        }
    }
}

fn create_bucket(node: &Node, key_id: &str, name: &str) {
    node.must(&["bucket", "create", name]);
    node.must(&[
        "bucket", "allow", "--read", "--write", "--owner", name, "--key", key_id,
    ]);
}

/// A single Garage node, replication factor 1, zone `dc1`.
pub struct Garage {
    node: Node,
    key_id: String,
    secret: String,
    _dir: tempfile::TempDir,
}

impl Garage {
    pub fn start() -> Option<Garage> {
        let Some(exe) = garage_exe() else {
            return missing("garage", INSTALL);
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut node = Node::new(&exe, dir.path().join("node1"), "garage", 1, &random_hex(32));
        node.start();
        let (key_id, secret) = set_up(std::slice::from_mut(&mut node));
        create_bucket(&node, &key_id, DEFAULT_BUCKET);
        Some(Garage {
            node,
            key_id,
            secret,
            _dir: dir,
        })
    }

    pub fn endpoint(&self) -> String {
        self.node.endpoint()
    }

    pub fn bucket(&self) -> String {
        DEFAULT_BUCKET.to_string()
    }

    pub fn region(&self) -> String {
        REGION.to_string()
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::S3 {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            session_token: None,
        }
    }

    pub fn options(&self) -> RemoteOptions {
        s3_options(&self.endpoint(), REGION, self.credentials())
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{DEFAULT_BUCKET}/{prefix}")
    }

    /// Creates a bucket the key can read, write and own.
    pub fn create_bucket(&self, name: &str) {
        create_bucket(&self.node, &self.key_id, name);
    }

    /// Stops the server (its data stays); `start_again` brings it back.
    pub fn stop(&mut self) {
        self.node.stop();
    }

    pub fn start_again(&mut self) {
        self.node.start();
        self.node.wait_healthy(1);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.dir.join("garage.log")).unwrap_or_default()
    }
}

/// Garage on several nodes, each its own zone (`dc1`..`dcN`), replication factor 3: a model
/// of regions. Nodes can be stopped and started again on the same data.
pub struct GarageCluster {
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    _dir: tempfile::TempDir,
}

impl GarageCluster {
    /// `nodes` must be at least 3 (the replication factor).
    pub fn start(nodes: usize) -> Option<GarageCluster> {
        assert!(nodes >= 3, "replication factor 3 needs at least 3 nodes");
        let Some(exe) = garage_exe() else {
            return missing("garage", INSTALL);
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let secret = random_hex(32);
        let mut all: Vec<Node> = (1..=nodes)
            .map(|i| {
                let name = format!("garage{i}");
                Node::new(&exe, dir.path().join(&name), &name, 3, &secret)
            })
            .collect();
        for node in &mut all {
            node.start();
        }
        let (key_id, secret) = set_up(&mut all);
        create_bucket(&all[0], &key_id, DEFAULT_BUCKET);
        Some(GarageCluster {
            nodes: all,
            key_id,
            secret,
            _dir: dir,
        })
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Node `node`'s S3 endpoint (nodes count from 0).
    pub fn endpoint(&self, node: usize) -> String {
        self.nodes[node].endpoint()
    }

    /// Node `node`'s zone, `dc1` for node 0.
    pub fn zone(&self, node: usize) -> String {
        format!("dc{}", node + 1)
    }

    pub fn bucket(&self) -> String {
        DEFAULT_BUCKET.to_string()
    }

    pub fn region(&self) -> String {
        REGION.to_string()
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::S3 {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            session_token: None,
        }
    }

    /// Options that reach the cluster through node `node`.
    pub fn options(&self, node: usize) -> RemoteOptions {
        s3_options(&self.endpoint(node), REGION, self.credentials())
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{DEFAULT_BUCKET}/{prefix}")
    }

    /// Kills node `i` (as a crash would); its data stays.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its data; returns once it is back in a healthy cluster.
    pub fn start_node(&mut self, i: usize) {
        self.nodes[i].start();
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.process.is_some()).collect();
        let up = running.len();
        connect_all(running);
        for node in self.nodes.iter_mut().filter(|n| n.process.is_some()) {
            node.wait_healthy(up);
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].process.is_some()
    }

    /// Creates a bucket (through a running node) the key can read, write and own.
    pub fn create_bucket(&self, name: &str) {
        let node = self
            .nodes
            .iter()
            .find(|n| n.process.is_some())
            .expect("a running node");
        create_bucket(node, &self.key_id, name);
    }
}
