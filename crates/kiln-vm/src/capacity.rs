//! What VMs may hold: per tenant (live VMs, their memory) and per host
//! (VMs and memory in all, warm and booting ones included). Room is
//! reserved before a boot starts and given back when the reservation is
//! dropped, so concurrent creates cannot all pass one check and overshoot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kiln_core::{QuotaExceeded, TenantQuotas};

use crate::config::HostCapacity;
use crate::VmError;

/// A lock that a panic elsewhere does not poison for everyone after: the
/// counters and maps behind these locks stay consistent at every step.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Held {
    vms: u64,
    memory_mib: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    host: Held,
    tenants: HashMap<String, Held>,
}

/// The accounting of one VM manager.
#[derive(Debug)]
pub struct Capacity {
    ledger: Mutex<Ledger>,
    host: HostCapacity,
    /// Memory VMs may use in all, fixed at start.
    budget_mib: u64,
    /// QEMU's own memory per VM, counted with the guest's.
    overhead_mib: u64,
    quotas: TenantQuotas,
    overrides: Mutex<HashMap<String, TenantQuotas>>,
}

impl Capacity {
    pub fn new(host: HostCapacity, overhead_mib: u64, quotas: TenantQuotas) -> Arc<Capacity> {
        let budget_mib = host.memory_mib.unwrap_or_else(|| {
            mem_available_mib()
                .unwrap_or(0)
                .saturating_sub(host.memory_reserve_mib)
        });
        tracing::info!(
            vms_max = host.vms_max,
            memory_mib = budget_mib,
            "VM host capacity"
        );
        Arc::new(Capacity {
            ledger: Mutex::default(),
            host,
            budget_mib,
            overhead_mib,
            quotas,
            overrides: Mutex::default(),
        })
    }

    /// Gives a tenant limits other than the deployment's.
    pub fn set_quotas(&self, tenant: &str, quotas: TenantQuotas) {
        lock(&self.overrides).insert(tenant.to_string(), quotas);
    }

    fn quotas(&self, tenant: &str) -> TenantQuotas {
        lock(&self.overrides)
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| self.quotas.clone())
    }

    fn no_room(&self, reason: &'static str) -> VmError {
        VmError::NoCapacity {
            reason,
            retry_after_s: self.host.retry_after_s,
        }
    }

    /// Room on the host for one VM of `memory_mib`, or `NoCapacity`.
    pub fn reserve_host(self: &Arc<Self>, memory_mib: u32) -> Result<HostSlot, VmError> {
        let need = u64::from(memory_mib) + self.overhead_mib;
        let mut ledger = lock(&self.ledger);
        if ledger.host.vms >= u64::from(self.host.vms_max) {
            return Err(self.no_room("every VM slot of the host is taken"));
        }
        if ledger.host.memory_mib.saturating_add(need) > self.budget_mib {
            return Err(self.no_room("the host's VM memory is taken"));
        }
        // Memory used by others since the start counts too: never boot
        // into an out-of-memory kill.
        if mem_available_mib()
            .is_some_and(|free| free < need.saturating_add(self.host.memory_reserve_mib))
        {
            return Err(self.no_room("the host is short of free memory"));
        }
        ledger.host.vms += 1;
        ledger.host.memory_mib += need;
        Ok(HostSlot {
            capacity: self.clone(),
            memory_mib: need,
        })
    }

    /// Free VM slots and free VM memory (MiB, QEMU's overhead included)
    /// on the host now: what placement across hosts compares.
    pub fn room(&self) -> (u64, u64) {
        let ledger = lock(&self.ledger);
        (
            u64::from(self.host.vms_max).saturating_sub(ledger.host.vms),
            self.budget_mib.saturating_sub(ledger.host.memory_mib),
        )
    }

    /// Room in a tenant's quota for one more VM of `memory_mib`.
    pub fn reserve_tenant(
        self: &Arc<Self>,
        tenant: &str,
        memory_mib: u32,
    ) -> Result<TenantSlot, QuotaExceeded> {
        let quotas = self.quotas(tenant);
        let memory = u64::from(memory_mib);
        let mut ledger = lock(&self.ledger);
        let held = ledger.tenants.entry(tenant.to_string()).or_default();
        if held.vms >= u64::from(quotas.vms_live_max) {
            return Err(QuotaExceeded {
                what: "live VMs",
                limit: u64::from(quotas.vms_live_max),
            });
        }
        if held.memory_mib.saturating_add(memory) > quotas.vm_memory_mib_max {
            return Err(QuotaExceeded {
                what: "memory of live VMs (MiB)",
                limit: quotas.vm_memory_mib_max,
            });
        }
        held.vms += 1;
        held.memory_mib += memory;
        Ok(TenantSlot {
            capacity: self.clone(),
            tenant: tenant.to_string(),
            memory_mib: memory,
        })
    }
}

/// A VM's share of the host, given back when dropped.
#[derive(Debug)]
pub struct HostSlot {
    capacity: Arc<Capacity>,
    memory_mib: u64,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut ledger = lock(&self.capacity.ledger);
        ledger.host.vms = ledger.host.vms.saturating_sub(1);
        ledger.host.memory_mib = ledger.host.memory_mib.saturating_sub(self.memory_mib);
    }
}

/// A VM's share of its tenant's quota, given back when dropped.
#[derive(Debug)]
pub struct TenantSlot {
    capacity: Arc<Capacity>,
    tenant: String,
    memory_mib: u64,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut ledger = lock(&self.capacity.ledger);
        if let Some(held) = ledger.tenants.get_mut(&self.tenant) {
            held.vms = held.vms.saturating_sub(1);
            held.memory_mib = held.memory_mib.saturating_sub(self.memory_mib);
            if held.vms == 0 {
                ledger.tenants.remove(&self.tenant);
            }
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in MiB.
fn mem_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let kib = line.strip_prefix("MemAvailable:")?;
        Some(
            kib.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?
                / 1024,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(vms_max: u32, memory_mib: u64, quotas: TenantQuotas) -> Arc<Capacity> {
        Capacity::new(
            HostCapacity {
                vms_max,
                memory_mib: Some(memory_mib),
                memory_reserve_mib: 0,
                retry_after_s: 7,
            },
            64,
            quotas,
        )
    }

    #[test]
    fn a_tenant_is_held_to_its_vm_count_and_memory() {
        let quotas = TenantQuotas {
            vms_live_max: 2,
            vm_memory_mib_max: 300,
            ..TenantQuotas::default()
        };
        let capacity = capacity(100, 100_000, quotas);
        let a = capacity.reserve_tenant("acme", 128).unwrap();
        let too_much = capacity.reserve_tenant("acme", 256).unwrap_err();
        assert_eq!(too_much.limit, 300, "{too_much}");
        let b = capacity.reserve_tenant("acme", 128).unwrap();
        let too_many = capacity.reserve_tenant("acme", 64).unwrap_err();
        assert_eq!((too_many.what, too_many.limit), ("live VMs", 2));
        assert!(
            capacity.reserve_tenant("globex", 128).is_ok(),
            "another tenant has its own quota"
        );
        drop((a, b));
        assert!(
            capacity.reserve_tenant("acme", 256).is_ok(),
            "deleted VMs give their room back"
        );
    }

    #[test]
    fn the_host_refuses_past_its_slots_or_memory_with_a_retry_hint() {
        let capacity = capacity(2, 400, TenantQuotas::default());
        let a = capacity.reserve_host(128).unwrap();
        let full = capacity.reserve_host(256).unwrap_err();
        assert!(
            matches!(
                full,
                VmError::NoCapacity {
                    retry_after_s: 7,
                    ..
                }
            ),
            "{full}"
        );
        let _b = capacity.reserve_host(128).unwrap();
        assert!(matches!(
            capacity.reserve_host(1),
            Err(VmError::NoCapacity { .. })
        ));
        drop(a);
        assert!(capacity.reserve_host(128).is_ok());
    }

    #[test]
    fn per_tenant_overrides_replace_the_default_quotas() {
        let capacity = capacity(100, 100_000, TenantQuotas::default());
        capacity.set_quotas(
            "small",
            TenantQuotas {
                vms_live_max: 0,
                ..TenantQuotas::default()
            },
        );
        assert!(capacity.reserve_tenant("small", 64).is_err());
        assert!(capacity.reserve_tenant("big", 64).is_ok());
    }
}
