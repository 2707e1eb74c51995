CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 3),
    status TEXT NOT NULL CHECK (status IN ('queued','scheduled','running','succeeded','failed','cancelled','dead')),
    spec TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    retry_from INTEGER NOT NULL DEFAULT 0,
    timeout_ms INTEGER NOT NULL,
    backoff TEXT NOT NULL,
    permanent_exit_codes TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT,
    run_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    lease_expires_at INTEGER,
    worker_id TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    result TEXT,
    error TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    CHECK (status <> 'running' OR lease_expires_at IS NOT NULL),
    CHECK (status NOT IN ('succeeded','failed','cancelled','dead') OR finished_at IS NOT NULL)
);
CREATE INDEX jobs_fetch ON jobs (priority, run_at, id) WHERE status IN ('queued','scheduled');
CREATE INDEX jobs_running ON jobs (queue, lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_tenant_id ON jobs (tenant, id);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE queues (
    name TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    concurrency_limit INTEGER CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    updated_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

CREATE TABLE modules (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    kinds TEXT NOT NULL,
    slots INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
