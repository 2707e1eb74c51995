-- VM networking's address management: one row per address a VM host has
-- given out. The primary key keeps an address unique on its host, the
-- index keeps MACs unique; rows go with their VM, and a host's start-up
-- reaper removes all of its own (its namespace was rebuilt empty).
CREATE TABLE vm_addresses (
    host TEXT NOT NULL,
    address TEXT NOT NULL,
    mac TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    network TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (host, address)
);
CREATE UNIQUE INDEX vm_addresses_mac ON vm_addresses (host, mac);
CREATE INDEX vm_addresses_vm ON vm_addresses (vm_id);
