-- Execution history: one row per command run in a VM, from the API
-- (`api`), a WebSocket (`websocket`) or a job (`job`). A row is written
-- `running` when the command starts and finished when it ends, so a long
-- session shows up live; a process that dies in between leaves it
-- `running` until retention. Rows outlive their VM (VMs live in memory
-- only). No env values and no stdin are kept: secrets pass there. Output
-- is kept as a bounded head of each stream; `output_ref` says where the
-- rest went (`job:<id>`: that job's result).
CREATE TABLE vm_executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('api', 'websocket', 'job')),
    job_id INTEGER,
    actor TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    env_names TEXT NOT NULL,
    cwd TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'exited', 'error', 'abandoned')),
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    duration_ms INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    timed_out INTEGER NOT NULL DEFAULT 0 CHECK (timed_out IN (0, 1)),
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0 CHECK (truncated IN (0, 1)),
    stdout_head TEXT NOT NULL DEFAULT '',
    stderr_head TEXT NOT NULL DEFAULT '',
    output_ref TEXT,
    error TEXT
);
CREATE INDEX vm_executions_vm ON vm_executions (tenant, vm_id, id);
CREATE INDEX vm_executions_started ON vm_executions (started_at);
