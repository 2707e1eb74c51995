//! The nftables rule sets of a VM namespace, written as `nft -f` input
//! from typed values only (addresses, ports, interface names kiln made),
//! so nothing from a request is ever parsed by nft as words of its own.
//!
//! Two tables, both inside kiln's namespace:
//! - `inet kiln`: traffic a VM starts goes through its own chain (`vm-<tap>`,
//!   found by source address in the `egress` verdict map): its allow list,
//!   then `counter drop`. Answers to connections (`ct state established`)
//!   pass; anything from the bridge that names no VM is dropped and counted.
//!   With an uplink, egress leaving through it is masqueraded.
//! - `bridge kiln`: a frame from a TAP must carry its VM's MAC and address
//!   (no spoofing another VM's allow list), and frames between two TAPs pass
//!   only for pairs in `peers` (VMs of one tenant's named network).

use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The bridge inside the namespace.
pub const BRIDGE: &str = "kbr0";
/// kiln's end of the uplink veth pair, inside the namespace.
pub const UPLINK: &str = "kup0";
/// TAP devices are `kt<n>`.
pub const TAP_PREFIX: &str = "kt";

/// The namespace's base rule set, replacing whatever kiln had there.
pub fn base(uplink: bool) -> String {
    let mut out = String::new();
    // `add` then `delete` makes the delete safe on a fresh namespace.
    for table in ["inet kiln", "bridge kiln"] {
        let _ = writeln!(out, "add table {table}\ndelete table {table}");
    }
    let _ = writeln!(
        out,
        r#"table inet kiln {{
    map egress {{ type ipv4_addr : verdict; }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{BRIDGE}" ct state established,related accept
        iifname "{BRIDGE}" ip saddr vmap @egress
        iifname "{BRIDGE}" counter drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{BRIDGE}" ip saddr vmap @egress
        counter drop
    }}"#
    );
    if uplink {
        let _ = writeln!(
            out,
            r#"    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{UPLINK}" masquerade
    }}"#
        );
    }
    let _ = writeln!(
        out,
        r#"}}
table bridge kiln {{
    set addresses {{ type ifname . ipv4_addr; }}
    set macs {{ type ifname . ether_addr; }}
    set peers {{ type ifname . ifname; }}
    chain prerouting {{
        type filter hook prerouting priority 0; policy accept;
        iifname "{TAP_PREFIX}*" iifname . ether saddr != @macs counter drop
        iifname "{TAP_PREFIX}*" ether type ip iifname . ip saddr != @addresses counter drop
        iifname "{TAP_PREFIX}*" ether type arp iifname . arp saddr ip != @addresses counter drop
        iifname "{TAP_PREFIX}*" ether type != {{ ip, arp }} counter drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" iifname . oifname != @peers counter drop
    }}
}}"#
    );
    out
}

/// One allowed destination as the rule set sees it: a network and
/// perhaps a port (TCP and UDP alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub net: Ipv4Net,
    pub port: Option<u16>,
}

/// What the rules of one VM are made from.
#[derive(Clone, Debug)]
pub struct VmRules {
    pub tap: String,
    pub address: Ipv4Addr,
    pub mac: String,
    pub allowed: Vec<Allowed>,
    /// TAPs of the VMs it may reach (and be reached by) on the bridge.
    pub peers: Vec<String>,
}

fn chain(tap: &str) -> String {
    format!("vm-{tap}")
}

/// Adds a VM's chain, its verdict-map entry and its bridge identity.
pub fn add_vm(vm: &VmRules) -> String {
    let VmRules {
        tap, address, mac, ..
    } = vm;
    let chain = chain(tap);
    let mut out = format!("add chain inet kiln {chain}\n");
    for allowed in &vm.allowed {
        let port = match allowed.port {
            Some(port) => format!(" meta l4proto {{ tcp, udp }} th dport {port}"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "add rule inet kiln {chain} ip daddr {}{port} counter accept",
            allowed.net
        );
    }
    let _ = writeln!(out, "add rule inet kiln {chain} counter drop");
    let _ = writeln!(
        out,
        "add element inet kiln egress {{ {address} : jump {chain} }}"
    );
    let _ = writeln!(
        out,
        "add element bridge kiln addresses {{ \"{tap}\" . {address} }}"
    );
    let _ = writeln!(out, "add element bridge kiln macs {{ \"{tap}\" . {mac} }}");
    for peer in &vm.peers {
        let _ = writeln!(
            out,
            "add element bridge kiln peers {{ \"{tap}\" . \"{peer}\", \"{peer}\" . \"{tap}\" }}"
        );
    }
    out
}

/// Removes everything [`add_vm`] added.
pub fn remove_vm(vm: &VmRules) -> String {
    let VmRules {
        tap, address, mac, ..
    } = vm;
    let chain = chain(tap);
    let mut out = String::new();
    let _ = writeln!(out, "delete element inet kiln egress {{ {address} }}");
    let _ = writeln!(
        out,
        "flush chain inet kiln {chain}\ndelete chain inet kiln {chain}"
    );
    let _ = writeln!(
        out,
        "delete element bridge kiln addresses {{ \"{tap}\" . {address} }}"
    );
    let _ = writeln!(
        out,
        "delete element bridge kiln macs {{ \"{tap}\" . {mac} }}"
    );
    for peer in &vm.peers {
        let _ = writeln!(
            out,
            "delete element bridge kiln peers {{ \"{tap}\" . \"{peer}\", \"{peer}\" . \"{tap}\" }}"
        );
    }
    out
}

/// The chain a VM's drops are counted in.
pub fn vm_chain(tap: &str) -> String {
    chain(tap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_rule_set_names_only_typed_values() {
        let vm = VmRules {
            tap: "kt5".into(),
            address: Ipv4Addr::new(10, 77, 0, 5),
            mac: "02:ab:0a:4d:00:05".into(),
            allowed: vec![
                Allowed {
                    net: "10.0.0.0/8".parse().unwrap(),
                    port: Some(443),
                },
                Allowed {
                    net: "192.0.2.7/32".parse().unwrap(),
                    port: None,
                },
            ],
            peers: vec!["kt3".into()],
        };
        let add = add_vm(&vm);
        assert!(add.contains(
            "add rule inet kiln vm-kt5 ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th dport 443 counter accept"
        ));
        assert!(add.contains("add rule inet kiln vm-kt5 ip daddr 192.0.2.7/32 counter accept"));
        assert!(add
            .ends_with("add element bridge kiln peers { \"kt5\" . \"kt3\", \"kt3\" . \"kt5\" }\n"));
        // The drop comes after every accept.
        let drop = add.find("counter drop").unwrap();
        assert!(add.rfind("counter accept").unwrap() < drop);
        let remove = remove_vm(&vm);
        assert!(remove.starts_with("delete element inet kiln egress { 10.77.0.5 }"));
        assert!(remove.contains("delete chain inet kiln vm-kt5"));
        assert!(base(true).contains("masquerade"));
        assert!(!base(false).contains("masquerade"));
    }
}
