//! The servers themselves: they serve, they go away on drop, and cluster nodes rejoin.

use std::net::TcpStream;

use vmvault_store::Kind;
use vmvault_testkit::{Azurite, GarageCluster, Moto};

fn port_of(endpoint: &str) -> String {
    let rest = endpoint.trim_start_matches("http://");
    rest.split('/').next().unwrap().to_string()
}

fn listening(endpoint: &str) -> bool {
    TcpStream::connect(port_of(endpoint)).is_ok()
}

#[test]
fn servers_stop_with_their_children_on_drop() {
    if let Some(moto) = Moto::start() {
        let endpoint = moto.endpoint();
        assert!(listening(&endpoint));
        drop(moto);
        assert!(!listening(&endpoint), "moto still answers at {endpoint}");
    }
    if let Some(azurite) = Azurite::start() {
        let endpoint = azurite.endpoint();
        assert!(listening(&endpoint));
        drop(azurite);
        assert!(!listening(&endpoint), "azurite still answers at {endpoint}");
    }
}

/// Three nodes in three zones, replication factor 3: a write while one node is down reaches
/// it once it is back on its data, and any node serves it.
#[test]
fn a_cluster_node_rejoins_on_its_data() {
    let Some(mut cluster) = GarageCluster::start(3) else {
        return;
    };
    assert_eq!((cluster.nodes(), cluster.zone(2).as_str()), (3, "dc3"));
    cluster.create_bucket("rejoin");
    let url = "s3://rejoin/vault";
    cluster.stop_node(2);
    assert!(!cluster.is_running(2) && !listening(&cluster.endpoint(2)));
    let first = vmvault_cloud::open(url, &cluster.options(0)).unwrap();
    first
        .write(Kind::Point, "p1", b"written with dc3 down")
        .unwrap();
    cluster.start_node(2);
    cluster.stop_node(0);
    let third = vmvault_cloud::open(url, &cluster.options(2)).unwrap();
    assert_eq!(
        third.read(Kind::Point, "p1").unwrap(),
        b"written with dc3 down"
    );
    assert_eq!(third.list(Kind::Point).unwrap().len(), 1);
}
