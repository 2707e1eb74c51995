CREATE TABLE jobs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority SMALLINT NOT NULL CHECK (priority BETWEEN 0 AND 3),
    status TEXT NOT NULL CHECK (status IN ('queued','scheduled','running','succeeded','failed','cancelled','dead')),
    spec TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    retry_from INTEGER NOT NULL DEFAULT 0,
    timeout_ms BIGINT NOT NULL,
    backoff TEXT NOT NULL,
    permanent_exit_codes TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT,
    run_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    lease_expires_at BIGINT,
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
    updated_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE modules (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    kinds TEXT NOT NULL,
    slots INTEGER NOT NULL,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);

-- Wakes idle workers on every host; polling is only the fallback.
CREATE FUNCTION kiln_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kiln_jobs', '');
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs FOR EACH STATEMENT EXECUTE FUNCTION kiln_jobs_notify();
