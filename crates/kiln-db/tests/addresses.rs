//! VM addresses (the IPAM of VM networking) on SQLite and PostgreSQL: an
//! address and a MAC are each given once per host, freed one by one, and
//! all of a host's at once by its reaper, never another host's.

use kiln_db::addresses::VmAddress;
use kiln_db::Db;

kiln_db::on_both_databases!(addresses_are_unique_per_host_and_freed);

fn row(host: &str, address: &str, mac: &str, vm: &str) -> VmAddress {
    VmAddress {
        host: host.into(),
        address: address.into(),
        mac: mac.into(),
        vm_id: vm.into(),
        tenant: "acme".into(),
        network: None,
        created_at: 1_700_000_000_000,
    }
}

async fn addresses_are_unique_per_host_and_freed(db: Db) {
    assert!(db
        .vm_address_insert(&row("h1", "10.77.0.2", "02:01:0a:4d:00:02", "vm-a"))
        .await
        .unwrap());
    // The same address, or the same MAC, on the same host: refused.
    assert!(!db
        .vm_address_insert(&row("h1", "10.77.0.2", "02:01:0a:4d:00:09", "vm-b"))
        .await
        .unwrap());
    assert!(!db
        .vm_address_insert(&row("h1", "10.77.0.3", "02:01:0a:4d:00:02", "vm-b"))
        .await
        .unwrap());
    // Another host has its own subnet.
    assert!(db
        .vm_address_insert(&row("h2", "10.77.0.2", "02:01:0a:4d:00:02", "vm-c"))
        .await
        .unwrap());
    assert!(db
        .vm_address_insert(&row("h1", "10.77.0.3", "02:01:0a:4d:00:03", "vm-b"))
        .await
        .unwrap());
    assert_eq!(db.vm_address_list("h1").await.unwrap().len(), 2);

    assert!(db.vm_address_delete("h1", "10.77.0.2").await.unwrap());
    assert!(!db.vm_address_delete("h1", "10.77.0.2").await.unwrap());
    assert!(db
        .vm_address_insert(&row("h1", "10.77.0.2", "02:01:0a:4d:00:02", "vm-d"))
        .await
        .unwrap());

    assert_eq!(db.vm_address_delete_host("h1").await.unwrap(), 2);
    assert!(db.vm_address_list("h1").await.unwrap().is_empty());
    let left = db.vm_address_list("h2").await.unwrap();
    assert_eq!(
        left,
        vec![row("h2", "10.77.0.2", "02:01:0a:4d:00:02", "vm-c")]
    );
}
