-- The event log. Triggers append an event in the transaction of every state
-- change they watch (jobs, runs, run steps, schedule fires, API keys), so an
-- event exists exactly when its change committed, whatever path made it.
-- One connection writes, so positions are given in commit order; with
-- AUTOINCREMENT a position is never reused, even after retention empties
-- the table.
CREATE TABLE events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    resource_kind TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_tenant ON events (tenant, position);
CREATE INDEX events_resource ON events (tenant, resource_kind, resource_id, position);
CREATE INDEX events_time ON events (time);

CREATE TRIGGER jobs_events_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'job.queued', 'job', CAST(NEW.id AS TEXT), NEW.labels,
        json_object('kind', NEW.kind, 'queue', NEW.queue, 'status', NEW.status,
            'attempt', NEW.attempt, 'run_id', NEW.run_id));
END;

CREATE TRIGGER jobs_events_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status <> NEW.status
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        CASE WHEN NEW.status = 'running' THEN 'job.started'
             WHEN NEW.status IN ('queued', 'scheduled') THEN 'job.retried'
             ELSE 'job.' || NEW.status END,
        'job', CAST(NEW.id AS TEXT), NEW.labels,
        json_object('kind', NEW.kind, 'queue', NEW.queue, 'status', NEW.status,
            'attempt', NEW.attempt, 'run_id', NEW.run_id, 'error', substr(NEW.error, 1, 512)));
END;

CREATE TRIGGER runs_events_insert AFTER INSERT ON runs
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'run.' || NEW.status, 'run', CAST(NEW.id AS TEXT), NEW.labels,
        json_object('pipeline', NEW.pipeline, 'version', NEW.version, 'attempt', NEW.attempt,
            'status', NEW.status, 'reason', NEW.reason));
END;

CREATE TRIGGER runs_events_update AFTER UPDATE OF status ON runs
    WHEN OLD.status <> NEW.status
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'run.' || NEW.status, 'run', CAST(NEW.id AS TEXT), NEW.labels,
        json_object('pipeline', NEW.pipeline, 'version', NEW.version, 'attempt', NEW.attempt,
            'status', NEW.status, 'reason', NEW.reason));
END;

CREATE TRIGGER run_steps_events_insert AFTER INSERT ON run_steps
    WHEN NEW.status <> 'pending'
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), r.tenant,
        'step.' || NEW.status, 'step', NEW.run_id || '/' || NEW.step, r.labels,
        json_object('run_id', NEW.run_id, 'step', NEW.step, 'pipeline', r.pipeline,
            'status', NEW.status, 'total', NEW.total, 'succeeded', NEW.succeeded,
            'failed', NEW.failed)
    FROM runs r WHERE r.id = NEW.run_id;
END;

CREATE TRIGGER run_steps_events_update AFTER UPDATE OF status ON run_steps
    WHEN OLD.status <> NEW.status AND NEW.status <> 'pending'
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
    SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), r.tenant,
        'step.' || NEW.status, 'step', NEW.run_id || '/' || NEW.step, r.labels,
        json_object('run_id', NEW.run_id, 'step', NEW.step, 'pipeline', r.pipeline,
            'status', NEW.status, 'total', NEW.total, 'succeeded', NEW.succeeded,
            'failed', NEW.failed)
    FROM runs r WHERE r.id = NEW.run_id;
END;

CREATE TRIGGER schedule_fires_events AFTER UPDATE ON schedule_fires
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'schedule.fired', 'schedule', NEW.schedule,
        json_object('tick', NEW.tick, 'outcome', NEW.outcome, 'job_id', NEW.job_id,
            'run_id', NEW.run_id, 'error', substr(NEW.error, 1, 512)));
END;

CREATE TRIGGER api_keys_events_insert AFTER INSERT ON api_keys
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'key.created', 'key', NEW.id, json_object('name', NEW.name, 'scopes', NEW.scopes));
END;

CREATE TRIGGER api_keys_events_revoke AFTER UPDATE OF revoked_at ON api_keys
    WHEN OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'key.revoked', 'key', NEW.id, json_object('name', NEW.name));
END;

-- Where each reader of the log that keeps its place in the database (the
-- NATS bridge) stands: the last position it delivered.
CREATE TABLE event_cursors (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
