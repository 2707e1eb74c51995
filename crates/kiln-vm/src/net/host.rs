//! A VM host's network namespace and the NICs of its VMs.
//!
//! Layout (one namespace per VM directory, `kiln-<8 hex>`):
//! a bridge `kbr0` holding the subnet's first address (the VMs' gateway),
//! one TAP `kt<n>` per VM on it, nftables tables `inet kiln` and `bridge
//! kiln` (see [`super::rules`]), and, when configured, a veth pair `kup0` ↔
//! `kh-<8 hex>` to the host with egress masqueraded out of it.
//!
//! A TAP is made from inside the namespace by a short-lived thread that
//! joins it (`setns`), opens `/dev/net/tun` and names the device; the
//! descriptor goes to QEMU (`-netdev tap,fd=N`) like every other file QEMU
//! gets, so QEMU needs no privilege and never sees the namespace. The TAP
//! is not persistent: it disappears when QEMU, its last holder, exits —
//! however kiln ends. The namespace itself is removed and rebuilt empty by
//! the next start's reaper, with this host's address rows.
//!
//! `ip` (iproute2) and `nft` are run as programs, never through a shell,
//! with arguments kiln formats from typed values; netlink crates would do
//! the links too, but nftables has no maintained Rust binding and one tool
//! for each is easier to audit (`ip netns exec` is never used: `nft` runs
//! in the namespace by `setns` before exec).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;

use super::rules::{self, Allowed, VmRules, BRIDGE, TAP_PREFIX, UPLINK};
use super::{format_mac, mac_for, Destination, Egress, NetConfig, NetworkSpec};
use crate::capacity::lock;

/// Why networking failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command of iproute2 or nftables failed.
    #[error("{what}: {message}")]
    Command { what: String, message: String },
    /// The address database failed.
    #[error("address database: {0}")]
    Db(#[from] kiln_db::DbError),
    /// Every address of the subnet is taken.
    #[error("no free VM address in {0}")]
    Exhausted(Ipv4Net),
    /// An `allow` host name has no IPv4 address.
    #[error("network.allow: {0}")]
    Resolve(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The namespace's directory of names (`ip netns`).
const NETNS_DIR: &str = "/run/netns";

/// A VM host's namespace and what it has given out.
pub struct HostNetwork {
    /// `kiln-<8 hex>` of the VM directory.
    ns: String,
    /// The host end of the uplink: `kh-<8 hex>`.
    host_veth: String,
    /// Rows of this host in `vm_addresses`: host name and namespace.
    key: String,
    mac_byte: u8,
    config: NetConfig,
    db: kiln_db::Db,
    /// Built on the first networked VM.
    ready: tokio::sync::OnceCell<()>,
    /// Live NICs by TAP.
    nics: Mutex<HashMap<String, LiveNic>>,
    /// Serialises rule changes, so peers are computed on a settled set.
    rules_lock: tokio::sync::Mutex<()>,
}

/// What the rules of a live NIC were made from.
struct LiveNic {
    tenant: String,
    /// `<tenant>/<name>` of its named network.
    network: Option<String>,
    rules: VmRules,
}

/// A VM's NIC while it lives; [`HostNetwork::release`] takes it down.
#[derive(Debug)]
pub struct Nic {
    pub tap: String,
    pub address: Ipv4Addr,
    pub mac: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub dns: Option<Ipv4Addr>,
    pub expose: Vec<u16>,
    /// The TAP's descriptor, until QEMU holds its own copy.
    pub fd: Option<Arc<OwnedFd>>,
}

impl HostNetwork {
    /// The network of the VMs kept in `vm_dir`; nothing is built until the
    /// first networked VM (or [`HostNetwork::reap`]).
    pub fn new(vm_dir: &Path, config: NetConfig, db: kiln_db::Db) -> Result<HostNetwork, String> {
        config.check()?;
        let digest = dir_digest(vm_dir);
        let short = hex::encode(&digest[..4]);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Ok(HostNetwork {
            key: format!("{hostname}/kiln-{short}"),
            ns: format!("kiln-{short}"),
            host_veth: format!("kh-{short}"),
            mac_byte: digest[4],
            config,
            db,
            ready: tokio::sync::OnceCell::new(),
            nics: Mutex::default(),
            rules_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The namespace's name (`ip netns`).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    fn ns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.ns)
    }

    /// Removes what an earlier run left: the namespace with everything in
    /// it (bridge, TAPs, rules, the uplink) and this host's address rows.
    /// Returns whether there was a namespace. Run before any VM boots.
    pub async fn reap(&self) -> Result<bool, NetError> {
        let existed = self.ns_path().exists();
        if existed {
            ip(&["netns", "delete", &self.ns]).await?;
        }
        if link_exists(&self.host_veth).await {
            ip(&["link", "delete", &self.host_veth]).await?;
        }
        let rows = self.db.vm_address_delete_host(&self.key).await?;
        if existed || rows > 0 {
            tracing::info!(namespace = %self.ns, addresses = rows, "removed the VM network an earlier run left");
        }
        Ok(existed)
    }

    /// Removes the namespace with everything in it and the host end of the
    /// uplink (a graceful stop, after every VM was deleted).
    pub async fn remove(&self) {
        if self.ns_path().exists() {
            if let Err(error) = ip(&["netns", "delete", &self.ns]).await {
                tracing::warn!(%error, "could not remove the VM network namespace");
            }
        }
        if link_exists(&self.host_veth).await {
            let _ = ip(&["link", "delete", &self.host_veth]).await;
        }
    }

    /// Builds the namespace once.
    async fn ensure(&self) -> Result<(), NetError> {
        self.ready
            .get_or_try_init(|| async {
                self.reap().await?;
                self.build().await
            })
            .await
            .map(drop)
    }

    async fn build(&self) -> Result<(), NetError> {
        let ns = self.ns.as_str();
        let gateway = format!(
            "{}/{}",
            self.config.gateway(),
            self.config.subnet.prefix_len()
        );
        ip(&["netns", "add", ns]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"]).await?;
        ip(&["-n", ns, "addr", "add", &gateway, "dev", BRIDGE]).await?;
        ip(&["-n", ns, "link", "set", BRIDGE, "up"]).await?;
        if let Some((host_end, kiln_end)) = self.config.uplink_ends() {
            let prefix = self.config.uplink.map_or(30, |u| u.prefix_len());
            let veth = self.host_veth.as_str();
            ip(&[
                "link", "add", veth, "type", "veth", "peer", "name", UPLINK, "netns", ns,
            ])
            .await?;
            ip(&["addr", "add", &format!("{host_end}/{prefix}"), "dev", veth]).await?;
            ip(&["link", "set", veth, "up"]).await?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{kiln_end}/{prefix}"),
                "dev",
                UPLINK,
            ])
            .await?;
            ip(&["-n", ns, "link", "set", UPLINK, "up"]).await?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &host_end.to_string(),
            ])
            .await?;
        }
        // Routing between the bridge and the uplink, in this namespace only.
        let path = self.ns_path();
        in_namespace(&path, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            // Where br_netfilter is loaded (Docker hosts), bridged frames
            // would also pass the inet chains: VM-to-VM traffic is the
            // bridge table's alone. Per namespace since Linux 5.3.
            for family in ["iptables", "ip6tables", "arptables"] {
                let knob = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
                if Path::new(&knob).exists() {
                    std::fs::write(&knob, "0")?;
                }
            }
            Ok(())
        })
        .await?;
        self.nft(&rules::base(self.config.uplink.is_some())).await?;
        tracing::info!(namespace = %self.ns, subnet = %self.config.subnet, "VM network ready");
        Ok(())
    }

    async fn nft(&self, script: &str) -> Result<(), NetError> {
        nft_in(&self.ns_path(), script).await
    }

    /// Gives a VM an address, a MAC and a TAP on the bridge, with its rules
    /// in place. Host names in `allow` are resolved now, on the host.
    pub async fn attach(
        &self,
        vm_id: &str,
        tenant: &str,
        spec: &NetworkSpec,
    ) -> Result<Nic, NetError> {
        self.ensure().await?;
        let allowed = self.allowed(spec).await?;
        let network = spec.name.as_ref().map(|name| format!("{tenant}/{name}"));
        let (address, mac) = self.take_address(vm_id, tenant, network.as_deref()).await?;
        let attached = self
            .attach_taken(address, &mac, tenant, network, allowed, spec)
            .await;
        if attached.is_err() {
            let _ = self
                .db
                .vm_address_delete(&self.key, &address.to_string())
                .await;
        }
        attached
    }

    async fn attach_taken(
        &self,
        address: Ipv4Addr,
        mac: &str,
        tenant: &str,
        network: Option<String>,
        allowed: Vec<Allowed>,
        spec: &NetworkSpec,
    ) -> Result<Nic, NetError> {
        let offset = u32::from(address) - u32::from(self.config.subnet.network());
        let tap = format!("{TAP_PREFIX}{offset}");
        let fd = {
            let name = tap.clone();
            in_namespace(&self.ns_path(), move || open_tap(&name)).await?
        };
        ip(&["-n", &self.ns, "link", "set", &tap, "master", BRIDGE, "up"]).await?;
        let _rules = self.rules_lock.lock().await;
        let peers = match &network {
            Some(network) => lock(&self.nics)
                .iter()
                .filter(|(_, nic)| nic.tenant == tenant && nic.network.as_ref() == Some(network))
                .map(|(tap, _)| tap.clone())
                .collect(),
            None => Vec::new(),
        };
        let vm = VmRules {
            tap: tap.clone(),
            address,
            mac: mac.to_string(),
            allowed,
            peers,
        };
        self.nft(&rules::add_vm(&vm)).await?;
        lock(&self.nics).insert(
            tap.clone(),
            LiveNic {
                tenant: tenant.to_string(),
                network,
                rules: vm,
            },
        );
        Ok(Nic {
            tap,
            address,
            mac: mac.to_string(),
            gateway: self.config.gateway(),
            prefix: self.config.subnet.prefix_len(),
            dns: (spec.egress == Egress::Allow)
                .then_some(self.config.dns)
                .flatten(),
            expose: spec.expose.clone(),
            fd: Some(Arc::new(fd)),
        })
    }

    /// The allow list as networks and ports, host names resolved, and DNS
    /// to the configured resolver when egress is on.
    async fn allowed(&self, spec: &NetworkSpec) -> Result<Vec<Allowed>, NetError> {
        if spec.egress == Egress::None {
            return Ok(Vec::new());
        }
        let mut allowed = Vec::new();
        if let Some(dns) = self.config.dns {
            allowed.push(Allowed {
                net: Ipv4Net::from(dns),
                port: Some(53),
            });
        }
        for rule in &spec.allow {
            match &rule.to {
                Destination::Net(net) => allowed.push(Allowed {
                    net: *net,
                    port: rule.port,
                }),
                Destination::Host(host) => {
                    let port = rule.port.unwrap_or(0);
                    let found: Vec<Ipv4Addr> = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::lookup_host((host.as_str(), port)),
                    )
                    .await
                    .map_err(|_| NetError::Resolve(format!("{host}: resolving timed out")))?
                    .map_err(|e| NetError::Resolve(format!("{host}: {e}")))?
                    .filter_map(|addr| match addr {
                        SocketAddr::V4(v4) => Some(*v4.ip()),
                        SocketAddr::V6(_) => None,
                    })
                    .collect();
                    if found.is_empty() {
                        return Err(NetError::Resolve(format!("{host} has no IPv4 address")));
                    }
                    for addr in found.into_iter().take(16) {
                        allowed.push(Allowed {
                            net: Ipv4Net::from(addr),
                            port: rule.port,
                        });
                    }
                }
            }
        }
        Ok(allowed)
    }

    /// The lowest free address of the subnet, taken in the database.
    async fn take_address(
        &self,
        vm_id: &str,
        tenant: &str,
        network: Option<&str>,
    ) -> Result<(Ipv4Addr, String), NetError> {
        for _ in 0..8 {
            let taken: std::collections::HashSet<String> = self
                .db
                .vm_address_list(&self.key)
                .await?
                .into_iter()
                .map(|row| row.address)
                .collect();
            let Some(address) = self
                .config
                .vm_addresses()
                .find(|a| !taken.contains(&a.to_string()))
            else {
                return Err(NetError::Exhausted(self.config.subnet));
            };
            let mac = format_mac(mac_for(address, self.mac_byte));
            let row = kiln_db::addresses::VmAddress {
                host: self.key.clone(),
                address: address.to_string(),
                mac: mac.clone(),
                vm_id: vm_id.to_string(),
                tenant: tenant.to_string(),
                network: network.map(str::to_string),
                created_at: now_ms(),
            };
            if self.db.vm_address_insert(&row).await? {
                return Ok((address, mac));
            }
        }
        Err(NetError::Exhausted(self.config.subnet))
    }

    /// Takes a VM's rules down and frees its address (its TAP went with
    /// its QEMU). Failures are logged: the next start's reaper removes the
    /// whole namespace anyway.
    pub async fn release(&self, nic: &Nic) {
        let _rules = self.rules_lock.lock().await;
        let removed = lock(&self.nics).remove(&nic.tap);
        if let Some(LiveNic { rules: vm, .. }) = removed {
            // Peers that left before it are no longer in its set.
            let live: Vec<String> = lock(&self.nics).keys().cloned().collect();
            let vm = VmRules {
                peers: vm.peers.into_iter().filter(|p| live.contains(p)).collect(),
                ..vm
            };
            if let Err(error) = self.nft(&rules::remove_vm(&vm)).await {
                tracing::warn!(%error, tap = %nic.tap, "could not remove a VM's rules");
            }
        }
        // A TAP QEMU never opened (a failed boot) goes with kiln's copy;
        // deleting it is for a QEMU that is still dying.
        if link_exists_in(&self.ns, &nic.tap).await {
            let _ = ip(&["-n", &self.ns, "link", "delete", &nic.tap]).await;
        }
        if let Err(error) = self
            .db
            .vm_address_delete(&self.key, &nic.address.to_string())
            .await
        {
            tracing::warn!(%error, address = %nic.address, "could not free a VM address");
        }
    }

    /// Packets a VM sent that its rules dropped.
    pub async fn dropped(&self, tap: &str) -> Option<u64> {
        let out = nft_output(
            &self.ns_path(),
            &["-j", "list", "chain", "inet", "kiln", &rules::vm_chain(tap)],
        )
        .await
        .ok()?;
        let json: serde_json::Value = serde_json::from_slice(&out).ok()?;
        // The chain's last rule is its `counter drop`.
        json["nftables"]
            .as_array()?
            .iter()
            .rev()
            .filter_map(|item| item.get("rule"))
            .filter(|rule| {
                rule["expr"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|x| x.get("drop").is_some()))
            })
            .filter_map(|rule| {
                rule["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|x| x.get("counter")?.get("packets")?.as_u64())
            })
            .next()
    }

    /// A TCP connection from inside the namespace to `address:port` (how
    /// the port proxy reaches a guest).
    pub async fn connect(
        &self,
        address: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket().await?;
        tokio::time::timeout(
            timeout,
            socket.connect(SocketAddrV4::new(address, port).into()),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    /// A TCP socket that belongs to the namespace (bind or connect it from
    /// anywhere).
    pub async fn tcp_socket(&self) -> std::io::Result<tokio::net::TcpSocket> {
        let fd = in_namespace(&self.ns_path(), || {
            // SAFETY: socket(2) with constant arguments; the descriptor is
            // owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }
}

/// A digest of the VM directory: names the namespace, so each data dir
/// (and each test) has its own, and a restart finds its predecessor's.
fn dir_digest(vm_dir: &Path) -> [u8; 32] {
    use sha2::Digest;
    let dir = std::fs::canonicalize(vm_dir).unwrap_or_else(|_| vm_dir.to_path_buf());
    sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()).into()
}

/// The namespace of the VMs kept in `vm_dir`.
pub fn namespace_for(vm_dir: &Path) -> String {
    format!("kiln-{}", hex::encode(&dir_digest(vm_dir)[..4]))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs `work` on a thread of its own that has joined the namespace at
/// `path` (a thread, not the process: nothing else changes namespace).
async fn in_namespace<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = std::fs::File::open(path)?;
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a namespace file this thread holds open;
            // it changes only the calling thread, which ends after `work`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            work()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("a namespace thread panicked")))
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("a namespace task failed")))
}

/// Opens a new TAP device named `name` in the calling thread's namespace.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("TAP name too long"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut request as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun.into())
}

/// Runs `command` (its namespace file, if any, is closed once it started).
async fn run(
    mut command: tokio::process::Command,
    what: String,
    stdin: Option<&str>,
    namespace: Option<std::fs::File>,
) -> Result<Vec<u8>, NetError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawned = command.spawn();
    drop(namespace);
    let mut child = spawned.map_err(|e| NetError::Command {
        what: what.clone(),
        message: e.to_string(),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| NetError::Command {
            what: what.clone(),
            message: "timed out".into(),
        })??;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(NetError::Command {
            what,
            message: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(1024)
                .collect(),
        })
    }
}

/// `ip ARGS…`.
async fn ip(args: &[&str]) -> Result<(), NetError> {
    let mut command = tokio::process::Command::new("ip");
    command.args(args);
    run(command, format!("ip {}", args.join(" ")), None, None)
        .await
        .map(drop)
}

async fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

async fn link_exists_in(ns: &str, name: &str) -> bool {
    ip(&["-n", ns, "link", "show", "dev", name]).await.is_ok()
}

/// `nft` started inside the namespace at `path`.
fn nft_command(path: &Path) -> std::io::Result<(tokio::process::Command, std::fs::File)> {
    let ns = std::fs::File::open(path)?;
    let mut command = tokio::process::Command::new("nft");
    let fd = ns.as_raw_fd();
    // SAFETY: setns(2) in the forked child before exec: one system call on
    // a descriptor opened before the fork, allocating nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Kept open until the child has started.
    Ok((command, ns))
}

async fn nft_in(path: &Path, script: &str) -> Result<(), NetError> {
    let (mut command, ns) = nft_command(path)?;
    command.args(["-f", "-"]);
    run(command, "nft".into(), Some(script), Some(ns))
        .await
        .map(drop)
}

async fn nft_output(path: &Path, args: &[&str]) -> Result<Vec<u8>, NetError> {
    let (mut command, ns) = nft_command(path)?;
    command.args(args);
    run(command, format!("nft {}", args.join(" ")), None, Some(ns)).await
}
