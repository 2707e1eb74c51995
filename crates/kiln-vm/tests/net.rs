//! The VM network without a VM: kiln's namespace, a TAP held by a
//! descriptor, its rules and its address, with real `ip` and `nft`; and
//! the reaper that removes all of it.

use std::process::Command;

use kiln_vm::net::host::{namespace_for, HostNetwork};
use kiln_vm::net::{NetConfig, NetworkSpec};

fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("`{program}` is needed (apt-get install iproute2 nftables): {e}")
        });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn database(dir: &std::path::Path) -> kiln_db::Db {
    kiln_db::Db::connect(&format!("sqlite://{}", dir.join("kiln.db").display()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_lives_with_its_descriptor_and_the_reaper_removes_the_rest() {
    let dir = std::env::temp_dir().join(format!("kiln-net-{}", std::process::id()));
    let vm_dir = dir.join("vms");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let db = database(&dir).await;
    let config = NetConfig {
        subnet: "10.79.0.0/28".parse().unwrap(),
        ..NetConfig::default()
    };
    let net = HostNetwork::new(&vm_dir, config.clone(), db.clone()).unwrap();
    let ns = namespace_for(&vm_dir);
    assert_eq!(net.namespace(), ns);
    net.reap().await.unwrap();

    let spec: NetworkSpec = serde_json::from_value(
        serde_json::json!({"egress": "allow", "allow": ["192.0.2.1:443"], "name": "team"}),
    )
    .unwrap();
    let first = net.attach("vm-a", "acme", &spec).await.unwrap();
    let second = net.attach("vm-b", "acme", &spec).await.unwrap();
    let other = net.attach("vm-c", "globex", &spec).await.unwrap();
    assert_eq!(first.address.to_string(), "10.79.0.2");
    assert_eq!(second.address.to_string(), "10.79.0.3");
    assert_ne!(first.mac, second.mac);

    let links = output("ip", &["-n", &ns, "-o", "link", "show"]);
    for tap in ["kt2", "kt3", "kt4"] {
        assert!(links.contains(&format!(" {tap}:")), "{links}");
        assert!(links.contains("master kbr0"), "{links}");
    }
    let rules = output("ip", &["netns", "exec", &ns, "nft", "list", "ruleset"]);
    assert!(rules.contains("chain vm-kt2"), "{rules}");
    assert!(
        rules.contains("ip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 443"),
        "{rules}"
    );
    // One tenant's named network pairs its VMs; another tenant's VM with
    // the same name is not their peer.
    assert!(rules.contains("\"kt3\" . \"kt2\""), "{rules}");
    assert!(
        !rules.contains("\"kt4\" . \"kt2\"") && !rules.contains("\"kt4\" . \"kt3\""),
        "{rules}"
    );
    assert_eq!(net.dropped("kt2").await, Some(0));

    // Freed: rules and address go; the TAP goes with its last descriptor.
    net.release(&first).await;
    drop(first);
    let rules = output("ip", &["netns", "exec", &ns, "nft", "list", "ruleset"]);
    assert!(
        !rules.contains("vm-kt2") && rules.contains("vm-kt3"),
        "{rules}"
    );
    assert!(!output("ip", &["-n", &ns, "-o", "link", "show"]).contains(" kt2:"));
    assert_eq!(
        db.vm_address_list(&format!("{}/{ns}", hostname()))
            .await
            .unwrap()
            .len(),
        2
    );
    let again = net.attach("vm-d", "acme", &spec).await.unwrap();
    assert_eq!(
        again.address.to_string(),
        "10.79.0.2",
        "a freed address is given again"
    );

    // A crash: QEMU dies (the TAPs with it), nothing is released. The
    // next start's reaper removes the namespace with its bridge, TAPs and
    // rules, and every address row.
    drop((second, other, again));
    drop(net);
    let next = HostNetwork::new(&vm_dir, config, db.clone()).unwrap();
    assert!(
        next.reap().await.unwrap(),
        "there was a namespace to remove"
    );
    assert!(!output("ip", &["netns", "list"]).contains(&ns));
    assert!(db
        .vm_address_list(&format!("{}/{ns}", hostname()))
        .await
        .unwrap()
        .is_empty());
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// With an uplink: a veth pair from kiln's namespace to the host (the only
/// thing kiln puts on the host), the default route through it and egress
/// masqueraded out of it; the reaper removes both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_is_a_veth_pair_and_goes_with_the_namespace() {
    let dir = std::env::temp_dir().join(format!("kiln-net-uplink-{}", std::process::id()));
    let vm_dir = dir.join("vms");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let db = database(&dir).await;
    let config = NetConfig {
        subnet: "10.80.0.0/28".parse().unwrap(),
        uplink: Some("169.254.231.0/30".parse().unwrap()),
        dns: None,
    };
    let net = HostNetwork::new(&vm_dir, config.clone(), db.clone()).unwrap();
    let ns = namespace_for(&vm_dir);
    let host_end = format!("kh-{}", ns.trim_start_matches("kiln-"));
    let spec: NetworkSpec = serde_json::from_value(serde_json::json!({"egress": "allow"})).unwrap();
    let nic = net.attach("vm-a", "acme", &spec).await.unwrap();
    let host = output("ip", &["-o", "addr", "show", "dev", &host_end]);
    assert!(host.contains("169.254.231.1/30"), "{host}");
    let routes = output("ip", &["-n", &ns, "route"]);
    assert!(
        routes.contains("default via 169.254.231.1 dev kup0"),
        "{routes}"
    );
    let rules = output("ip", &["netns", "exec", &ns, "nft", "list", "ruleset"]);
    assert!(rules.contains("oifname \"kup0\" masquerade"), "{rules}");
    drop(nic);
    assert!(HostNetwork::new(&vm_dir, config, db.clone())
        .unwrap()
        .reap()
        .await
        .unwrap());
    assert!(!std::path::Path::new("/sys/class/net")
        .join(&host_end)
        .exists());
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
