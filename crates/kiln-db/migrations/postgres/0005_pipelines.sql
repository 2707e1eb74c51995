-- Pipelines: every apply is a new immutable version; a run pins one.
CREATE TABLE pipelines (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (tenant, name, version)
);

CREATE TABLE runs (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    mode TEXT NOT NULL DEFAULT 'normal',
    params TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    trigger TEXT NOT NULL DEFAULT 'api',
    attempt INTEGER NOT NULL DEFAULT 1,
    reason TEXT,
    detail TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE UNIQUE INDEX runs_idempotency ON runs (tenant, pipeline, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_tenant ON runs (tenant, id);
CREATE INDEX runs_pipeline ON runs (tenant, pipeline, id);
-- Runs waiting for a slot under their pipeline's run concurrency.
CREATE INDEX runs_waiting ON runs (tenant, pipeline, id) WHERE status IN ('queued', 'running');

-- One row per step of a run: its state and, for gates and approvals, who or
-- what decided and why.
CREATE TABLE run_steps (
    run_id BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    started_at BIGINT,
    finished_at BIGINT,
    deadline_at BIGINT,
    detail TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE INDEX run_steps_deadline ON run_steps (deadline_at) WHERE status = 'waiting';

-- One row per instance of a job step (one per for_each item): the job that
-- runs it now, and a copy of what it produced, which dependants read even
-- after retention has deleted the job.
CREATE TABLE run_instances (
    run_id BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    job_id BIGINT,
    status TEXT NOT NULL,
    item TEXT,
    exit_code INTEGER,
    stdout TEXT,
    error TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (run_id, step, idx)
);
CREATE INDEX run_instances_job ON run_instances (job_id);

-- A step job's end, written by the trigger below in the transaction that
-- records it; the advancer consumes it in the transaction that moves the run.
CREATE TABLE flow_outbox (
    id BIGSERIAL PRIMARY KEY,
    run_id BIGINT NOT NULL,
    job_id BIGINT NOT NULL
);

ALTER TABLE jobs ADD COLUMN run_id BIGINT;

CREATE FUNCTION kiln_flow_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flow_outbox (run_id, job_id)
        SELECT n.run_id, n.id FROM new_rows n
        WHERE n.run_id IS NOT NULL AND n.status IN ('succeeded', 'failed', 'cancelled', 'dead')
        AND EXISTS (SELECT 1 FROM old_rows o WHERE o.id = n.id
            AND o.status NOT IN ('succeeded', 'failed', 'cancelled', 'dead'))
        ORDER BY n.id;
    IF FOUND THEN
        PERFORM pg_notify('kiln_flow', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_flow_outbox AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_flow_outbox();

-- Cron schedules: each fire is a row unique per schedule and tick, so
-- however many schedulers run, a tick fires once.
CREATE TABLE schedules (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    cron TEXT NOT NULL,
    timezone TEXT NOT NULL,
    target TEXT NOT NULL,
    overlap TEXT NOT NULL,
    catch_up TEXT NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    next_fire_at BIGINT,
    last_fire_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

CREATE TABLE schedule_fires (
    tenant TEXT NOT NULL,
    schedule TEXT NOT NULL,
    tick BIGINT NOT NULL,
    fired_at BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    job_id BIGINT,
    run_id BIGINT,
    error TEXT,
    PRIMARY KEY (tenant, schedule, tick)
);
