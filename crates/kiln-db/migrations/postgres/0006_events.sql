-- The event log. Triggers append an event in the transaction of every state
-- change they watch (jobs, runs, run steps, schedule fires, API keys), so an
-- event exists exactly when its change committed, whatever path made it.
--
-- `seq` orders rows as they were inserted, which is not the order in which
-- their transactions commit. Readers see `position` instead: the sequencer
-- (one at a time, under an advisory lock) numbers, in `seq` order, the rows
-- whose transaction ended before the oldest one still running
-- (`xid < pg_snapshot_xmin(...)`); no row can appear later below a position
-- already given, so a reader resuming after position N misses nothing.
CREATE TABLE events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    position BIGINT,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    time BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    resource_kind TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    data TEXT NOT NULL DEFAULT '{}'
);
-- The insert that a state change pays for touches only the primary key, the
-- small index of rows waiting for a number and a BRIN index on time; the
-- indexes readers use cover numbered rows, written when the sequencer
-- numbers them, off the writer's path.
CREATE INDEX events_unpositioned ON events (seq) WHERE position IS NULL;
CREATE UNIQUE INDEX events_position ON events (position) WHERE position IS NOT NULL;
CREATE INDEX events_tenant ON events (tenant, position) WHERE position IS NOT NULL;
CREATE INDEX events_resource ON events (tenant, resource_kind, resource_id, position)
    WHERE position IS NOT NULL;
CREATE INDEX events_time ON events USING brin (time);

CREATE FUNCTION kiln_now_ms() RETURNS BIGINT LANGUAGE sql AS
    $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

-- Job events come from statement-level triggers, one INSERT per statement
-- however many rows it moved (a batch of completions is one statement);
-- the data is built inline, which costs a third of a function call per row.

CREATE FUNCTION kiln_events_jobs_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    now_ms BIGINT := kiln_now_ms();
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
        SELECT now_ms, n.tenant, 'job.queued', 'job', n.id::text, n.labels,
            json_build_object('kind', n.kind, 'queue', n.queue, 'status', n.status,
                'attempt', n.attempt, 'run_id', n.run_id)::text
        FROM new_rows n;
    IF FOUND THEN
        PERFORM pg_notify('kiln_events', '');
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_events_jobs_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    now_ms BIGINT := kiln_now_ms();
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
        SELECT now_ms, n.tenant,
            CASE WHEN n.status = 'running' THEN 'job.started'
                 WHEN n.status IN ('queued', 'scheduled') THEN 'job.retried'
                 ELSE 'job.' || n.status END,
            'job', n.id::text, n.labels,
            json_build_object('kind', n.kind, 'queue', n.queue, 'status', n.status,
                'attempt', n.attempt, 'run_id', n.run_id, 'error', left(n.error, 512))::text
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status IS DISTINCT FROM n.status;
    IF FOUND THEN
        PERFORM pg_notify('kiln_events', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_events_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_events_jobs_insert();
CREATE TRIGGER jobs_events_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_events_jobs_update();

-- Runs, steps, schedule fires and keys change a row at a time.
CREATE FUNCTION kiln_events_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status THEN
        RETURN NULL;
    END IF;
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    VALUES (kiln_now_ms(), NEW.tenant, 'run.' || NEW.status, 'run', NEW.id::text, NEW.labels,
        json_strip_nulls(json_build_object('pipeline', NEW.pipeline, 'version', NEW.version,
            'attempt', NEW.attempt, 'status', NEW.status, 'reason', NEW.reason))::text);
    PERFORM pg_notify('kiln_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER runs_events AFTER INSERT OR UPDATE ON runs
    FOR EACH ROW EXECUTE FUNCTION kiln_events_runs();

CREATE FUNCTION kiln_events_run_steps() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending'
        OR (TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status) THEN
        RETURN NULL;
    END IF;
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    SELECT kiln_now_ms(), r.tenant, 'step.' || NEW.status, 'step', NEW.run_id || '/' || NEW.step,
        r.labels,
        json_build_object('run_id', NEW.run_id, 'step', NEW.step, 'pipeline', r.pipeline,
            'status', NEW.status, 'total', NEW.total, 'succeeded', NEW.succeeded,
            'failed', NEW.failed)::text
    FROM runs r WHERE r.id = NEW.run_id;
    PERFORM pg_notify('kiln_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER run_steps_events AFTER INSERT OR UPDATE ON run_steps
    FOR EACH ROW EXECUTE FUNCTION kiln_events_run_steps();

CREATE FUNCTION kiln_events_schedule_fires() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (kiln_now_ms(), NEW.tenant, 'schedule.fired', 'schedule', NEW.schedule,
        json_strip_nulls(json_build_object('tick', NEW.tick, 'outcome', NEW.outcome,
            'job_id', NEW.job_id, 'run_id', NEW.run_id, 'error', left(NEW.error, 512)))::text);
    PERFORM pg_notify('kiln_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER schedule_fires_events AFTER UPDATE ON schedule_fires
    FOR EACH ROW EXECUTE FUNCTION kiln_events_schedule_fires();

CREATE FUNCTION kiln_events_api_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), NEW.tenant, 'key.created', 'key', NEW.id,
            json_build_object('name', NEW.name, 'scopes', NEW.scopes)::text);
    ELSIF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), NEW.tenant, 'key.revoked', 'key', NEW.id,
            json_build_object('name', NEW.name)::text);
    ELSE
        RETURN NULL;
    END IF;
    PERFORM pg_notify('kiln_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER api_keys_events AFTER INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION kiln_events_api_keys();

-- Where each reader of the log that keeps its place in the database (the
-- NATS bridge) stands: the last position it delivered.
CREATE TABLE event_cursors (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
