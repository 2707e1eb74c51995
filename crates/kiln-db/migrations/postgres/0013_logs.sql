-- Live logs: the output of jobs and VM commands as it was produced, and
-- the nodes' own warn/info lines. A row is a chunk of one stream (lines
-- are not split across rows unless one is longer than a chunk). Small
-- volumes keep their text here; past a per-source threshold the text goes
-- to the blob store and the row keeps only `blob_key`. Node lines have the
-- tenant '' (they belong to the deployment, read with the system scope).
-- Retention deletes by `ts`.
CREATE TABLE log_chunks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('job', 'vm', 'node')),
    job_id BIGINT,
    attempt INTEGER,
    vm_id TEXT,
    exec_id BIGINT,
    node TEXT NOT NULL,
    stream TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'log')),
    seq BIGINT NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('error', 'warn', 'info', 'debug')),
    ts BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    text TEXT NOT NULL,
    blob_key TEXT
);
CREATE INDEX log_chunks_tenant ON log_chunks (tenant, id);
CREATE INDEX log_chunks_job ON log_chunks (tenant, job_id, id) WHERE job_id IS NOT NULL;
CREATE INDEX log_chunks_vm ON log_chunks (tenant, vm_id, id) WHERE vm_id IS NOT NULL;
CREATE INDEX log_chunks_ts ON log_chunks (ts);
-- Writers insert under a transaction-level advisory lock (4244), so ids
-- are handed out in commit order and a reader following `id > cursor`
-- never skips a row that commits late.

-- Where each reader of the whole store (the Loki pusher) has got to: the
-- id of the last chunk it delivered. Retention never deletes a chunk a
-- cursor has not passed.
CREATE TABLE log_cursors (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
