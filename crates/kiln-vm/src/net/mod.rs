//! Opt-in networking for VMs.
//!
//! [`NetworkSpec`] is what a request asks for (checked here, without I/O,
//! so the API refuses a bad one at submit). [`NetConfig`] is the host's
//! settings. [`host::HostNetwork`] does the work: everything lives in one
//! network namespace kiln creates for its VM directory, so the host's own
//! interfaces and firewall are never touched (see ARCHITECTURE.md,
//! "VM networking"). [`rules`] writes the nftables rule sets as text from
//! typed values only.

pub mod host;
pub mod rules;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Most `allow` entries one VM may carry.
pub const ALLOW_MAX: usize = 64;
/// Most exposed ports one VM may carry.
pub const EXPOSE_MAX: usize = 16;
/// The longest host name an `allow` entry may hold.
pub const HOST_NAME_MAX: usize = 253;

/// Whether a VM may open connections out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Nothing leaves the VM but answers to connections made to it.
    #[default]
    None,
    /// Connections to the `allow` entries (and DNS to kiln's resolver).
    Allow,
}

/// Where an `allow` entry points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Net(Ipv4Net),
    /// Resolved on the host when the VM is created.
    Host(String),
}

/// One `allow` entry: `10.0.0.0/8:443`, `192.0.2.7` (any port),
/// `example.com:443`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub to: Destination,
    /// Any port when absent (addresses only; a host name needs a port).
    pub port: Option<u16>,
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.to {
            Destination::Net(net) if net.prefix_len() == 32 => write!(f, "{}", net.addr())?,
            Destination::Net(net) => write!(f, "{net}")?,
            Destination::Host(host) => f.write_str(host)?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl AllowRule {
    /// Parses one entry; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<AllowRule, String> {
        let (to, port) = match text.rsplit_once(':') {
            Some((to, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{port:?} is not a port (1 to 65535)"))?;
                (to, Some(port))
            }
            None => (text, None),
        };
        if to.contains(':') || to.starts_with('[') {
            return Err("only IPv4 addresses and host names are allowed".into());
        }
        if let Ok(addr) = to.parse::<Ipv4Addr>() {
            return Ok(AllowRule {
                to: Destination::Net(Ipv4Net::from(addr)),
                port,
            });
        }
        if to.contains('/') {
            let net: Ipv4Net = to
                .parse()
                .map_err(|_| format!("{to:?} is not an IPv4 CIDR (a.b.c.d/0-32)"))?;
            return Ok(AllowRule {
                to: Destination::Net(net.trunc()),
                port,
            });
        }
        check_host_name(to)?;
        if port.is_none() {
            return Err(format!("{to:?} needs a port (host:port)"));
        }
        Ok(AllowRule {
            to: Destination::Host(to.to_ascii_lowercase()),
            port,
        })
    }
}

/// A DNS name: labels of letters, digits and `-`, not starting or ending
/// with `-`, at most 63 bytes each and 253 in all.
fn check_host_name(name: &str) -> Result<(), String> {
    let bad = || format!("{name:?} is neither an IPv4 address, a CIDR nor a host name");
    if name.is_empty() || name.len() > HOST_NAME_MAX {
        return Err(bad());
    }
    let labels_ok = name.trim_end_matches('.').split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    // All digits and dots would be a mistyped address, not a name.
    let numeric = name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if labels_ok && !numeric {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A VM's `network`: off unless asked for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "serde_json::Value")]
pub struct NetworkSpec {
    /// `none` (default) or `allow`.
    pub egress: Egress,
    /// With `egress: allow`: `CIDR[:port]`, `address[:port]` or
    /// `host:port` (at most 64).
    #[schema(value_type = Vec<String>)]
    pub allow: Vec<AllowRule>,
    /// Guest TCP ports reachable through `/api/v1/vms/{id}/ports/{port}/`
    /// (at most 16).
    pub expose: Vec<u16>,
    /// VMs of one tenant in the same named network may reach each other;
    /// others never do.
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    egress: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    expose: Vec<u32>,
    name: Option<String>,
}

impl TryFrom<serde_json::Value> for NetworkSpec {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<NetworkSpec, String> {
        let raw: RawNetwork = serde_json::from_value(value).map_err(|e| format!("network: {e}"))?;
        let egress = match raw.egress.as_deref() {
            None | Some("none") => Egress::None,
            Some("allow") => Egress::Allow,
            Some(_) => return Err("network.egress must be \"none\" or \"allow\"".into()),
        };
        if raw.allow.len() > ALLOW_MAX {
            return Err(format!("network.allow: at most {ALLOW_MAX} entries"));
        }
        if egress == Egress::None && !raw.allow.is_empty() {
            return Err("network.allow needs network.egress \"allow\"".into());
        }
        let allow = raw
            .allow
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                AllowRule::parse(entry).map_err(|why| format!("network.allow[{i}]: {why}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if raw.expose.len() > EXPOSE_MAX {
            return Err(format!("network.expose: at most {EXPOSE_MAX} ports"));
        }
        let mut expose = Vec::with_capacity(raw.expose.len());
        for (i, port) in raw.expose.iter().enumerate() {
            let port = u16::try_from(*port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("network.expose[{i}]: {port} is not a port (1 to 65535)"))?;
            if !expose.contains(&port) {
                expose.push(port);
            }
        }
        if let Some(name) = &raw.name {
            kiln_core::names::check_ident("network.name", name).map_err(|e| e.to_string())?;
        }
        Ok(NetworkSpec {
            egress,
            allow,
            expose,
            name: raw.name,
        })
    }
}

impl NetworkSpec {
    /// What admission policies read as `job.network`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "egress": match self.egress {
                Egress::None => "none",
                Egress::Allow => "allow",
            },
            "allow": self.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "expose": self.expose,
            "name": self.name,
        })
    }
}

/// The host's networking settings (`[vm.network]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// VM addresses come from here; the first is the bridge's (the VMs'
    /// gateway). At most a /16, at least a /29 (`KILN_VM_SUBNET`).
    pub subnet: Ipv4Net,
    /// The resolver VMs with egress are given (and allowed to reach on
    /// port 53); none: no `/etc/resolv.conf` is written.
    pub dns: Option<Ipv4Addr>,
    /// A transfer network of two addresses (a /30 or /31) for a veth pair
    /// out of the namespace: kiln's end gets the second address and the
    /// host's end the first; VMs' allowed egress is masqueraded out of it.
    /// None: VMs reach only what is inside the namespace. Routing beyond
    /// the host's end is the host's own business (kiln touches no host
    /// firewall or sysctl).
    pub uplink: Option<Ipv4Net>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            subnet: "10.77.0.0/24".parse().expect("a CIDR"),
            dns: None,
            uplink: None,
        }
    }
}

impl NetConfig {
    /// Refuses settings the namespace cannot be built from.
    pub fn check(&self) -> Result<(), String> {
        let prefix = self.subnet.prefix_len();
        if !(16..=29).contains(&prefix) {
            return Err(format!(
                "vm.network.subnet {}: use a /16 to a /29",
                self.subnet
            ));
        }
        if let Some(uplink) = self.uplink {
            if !(30..=31).contains(&uplink.prefix_len()) {
                return Err(format!("vm.network.uplink {uplink}: use a /30 or a /31"));
            }
            if uplink.contains(&self.subnet.network()) || self.subnet.contains(&uplink.network()) {
                return Err("vm.network.uplink overlaps vm.network.subnet".into());
            }
        }
        Ok(())
    }

    /// The bridge's address: the VMs' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        nth(self.subnet, 1)
    }

    /// Addresses VMs may be given: all but the network, the gateway and
    /// the broadcast address.
    pub fn vm_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let size = 1u32 << (32 - self.subnet.prefix_len());
        (2..size - 1).map(|i| nth(self.subnet, i))
    }

    /// The two ends of the uplink: (the host's, kiln's).
    pub fn uplink_ends(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let uplink = self.uplink?;
        let first = if uplink.prefix_len() == 31 { 0 } else { 1 };
        Some((nth(uplink, first), nth(uplink, first + 1)))
    }
}

fn nth(net: Ipv4Net, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(i))
}

/// A VM's MAC address: locally administered, unicast, from its address
/// (unique wherever the address is) and a per-host byte.
pub fn mac_for(address: Ipv4Addr, host_byte: u8) -> [u8; 6] {
    let o = address.octets();
    [0x02, host_byte, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: serde_json::Value) -> Result<NetworkSpec, String> {
        serde_json::from_value::<NetworkSpec>(spec).map_err(|e| e.to_string())
    }

    #[test]
    fn allow_entries_parse_or_say_why_not() {
        let ok = |text: &str, shown: &str| {
            let rule = AllowRule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rule.to_string(), shown, "{text}");
        };
        ok("10.0.0.0/8:443", "10.0.0.0/8:443");
        ok("10.1.2.3/8:443", "10.0.0.0/8:443");
        ok("192.0.2.7", "192.0.2.7");
        ok("192.0.2.7:80", "192.0.2.7:80");
        ok("0.0.0.0/0", "0.0.0.0/0");
        ok("Example.COM:443", "example.com:443");
        let bad = |text: &str, why: &str| {
            let error = AllowRule::parse(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
        };
        bad("10.0.0.0/33:443", "CIDR");
        bad("10.0.0.0/8:0", "port");
        bad("10.0.0.0/8:65536", "port");
        bad("10.0.0.0/8:http", "port");
        bad("example.com", "needs a port");
        bad("[::1]:443", "IPv4");
        bad("::1", "IPv4");
        bad("256.1.1.1:80", "neither");
        bad("-bad.example:80", "neither");
        bad("a b:80", "neither");
        bad("$(reboot):80", "neither");
        bad(&format!("{}:80", "a".repeat(300)), "neither");
    }

    #[test]
    fn network_specs_are_checked_field_by_field() {
        let spec = check(serde_json::json!({"egress": "allow", "allow": ["10.0.0.0/8:443"], "expose": [8000, 8000]})).unwrap();
        assert_eq!(spec.expose, vec![8000]);
        assert_eq!(spec.egress, Egress::Allow);
        let spec = check(serde_json::json!({})).unwrap();
        assert_eq!(spec.egress, Egress::None);
        for (spec, field) in [
            (
                serde_json::json!({"allow": ["10.0.0.0/8:443"]}),
                "network.allow needs",
            ),
            (
                serde_json::json!({"egress": "allow", "allow": ["10.0.0.0/40"]}),
                "network.allow[0]",
            ),
            (
                serde_json::json!({"egress": "allow", "allow": ["1.1.1.1", "x:99999"]}),
                "network.allow[1]",
            ),
            (serde_json::json!({"expose": [0]}), "network.expose[0]"),
            (serde_json::json!({"expose": [70000]}), "network.expose[0]"),
            (serde_json::json!({"egress": "all"}), "network.egress"),
            (serde_json::json!({"name": "../x"}), "network.name"),
            (serde_json::json!({"ports": [1]}), "network: unknown field"),
            (serde_json::json!({"expose": "80"}), "network: invalid type"),
            (
                serde_json::json!({"expose": (1..=17).collect::<Vec<_>>()}),
                "at most 16",
            ),
        ] {
            let error = check(spec.clone()).expect_err(&spec.to_string());
            assert!(error.contains(field), "{spec}: {error}");
        }
    }

    #[test]
    fn the_subnet_gives_a_gateway_and_vm_addresses() {
        let config = NetConfig {
            subnet: "10.9.0.0/29".parse().unwrap(),
            uplink: Some("169.254.9.0/30".parse().unwrap()),
            dns: None,
        };
        config.check().unwrap();
        assert_eq!(config.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        let all: Vec<_> = config.vm_addresses().collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 9, 0, 6)));
        assert_eq!(
            config.uplink_ends(),
            Some((Ipv4Addr::new(169, 254, 9, 1), Ipv4Addr::new(169, 254, 9, 2)))
        );
        for bad in ["10.0.0.0/8", "10.0.0.0/30"] {
            let config = NetConfig {
                subnet: bad.parse().unwrap(),
                ..NetConfig::default()
            };
            assert!(config.check().is_err(), "{bad}");
        }
        assert_eq!(
            format_mac(mac_for(Ipv4Addr::new(10, 77, 0, 2), 0xab)),
            "02:ab:0a:4d:00:02"
        );
    }
}
