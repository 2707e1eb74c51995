-- VMs across hosts. A VM lives in the memory of the process that booted it;
-- these rows let every node find it: `vm_hosts` lists the processes that
-- host VMs (their internal address and free room, written by their own
-- heartbeat), `vms` every VM with its owner's tag, written by the owner in
-- the transaction of its `vm.*` event. A VM's id ends in `@<tag>`, so a node
-- learns the owner from the id alone; the rows answer lists and tenancy.
CREATE TABLE vm_hosts (
    tag TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    url TEXT NOT NULL,
    accelerator TEXT NOT NULL,
    vms_free BIGINT NOT NULL,
    memory_free_mib BIGINT NOT NULL,
    vms_live INTEGER NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX vm_hosts_node ON vm_hosts (node_id);

CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    host TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'deleted', 'expired', 'lost')),
    image TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib BIGINT NOT NULL,
    accelerator TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    ended_at BIGINT,
    boot_ms BIGINT NOT NULL,
    CHECK ((status = 'running') = (ended_at IS NULL))
);
CREATE INDEX vms_tenant ON vms (tenant, status, id);
CREATE INDEX vms_host ON vms (host, status);
CREATE INDEX vms_ended ON vms (ended_at);

-- Secrets the deployment's own processes share (the key that signs the
-- tenant an API node forwards to a VM host), made by the first process
-- that needs one.
CREATE TABLE internal_secrets (
    name TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
