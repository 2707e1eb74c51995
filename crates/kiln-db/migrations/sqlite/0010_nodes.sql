-- The fleet: one row per kiln process (`serve`, `api`, `worker`,
-- `scheduler`), written by its own heartbeat, and a short load series per
-- node. `workers` (0001) stays as it was: it lists job runners only, and
-- retention forgets silent ones, while a node is kept `lost` (with an
-- event) so operators see what went away.
--
-- `status` is what the fleet sees (`online`, `draining`, `lost`); `drain` is
-- what an operator asked for, kept across a loss: a draining node that comes
-- back is still draining. Lists are JSON arrays of names.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    roles TEXT NOT NULL,
    version TEXT NOT NULL,
    kinds TEXT NOT NULL,
    slots_used INTEGER NOT NULL,
    slots_total INTEGER NOT NULL,
    accelerator TEXT,
    vms_live INTEGER NOT NULL,
    cpu REAL,
    load1 REAL,
    mem_used REAL,
    mem_total_bytes INTEGER,
    status TEXT NOT NULL CHECK (status IN ('online', 'draining', 'lost')),
    drain INTEGER NOT NULL DEFAULT 0 CHECK (drain IN (0, 1)),
    started_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    lost_at INTEGER,
    CHECK ((status = 'lost') = (lost_at IS NOT NULL))
);
CREATE INDEX nodes_status_last_seen ON nodes (status, last_seen);

-- One row per heartbeat; each heartbeat deletes its node's rows past the
-- window, and the lost-node detector those of every node.
CREATE TABLE node_load (
    node_id TEXT NOT NULL,
    time INTEGER NOT NULL,
    cpu REAL,
    load1 REAL,
    mem_used REAL,
    slots_used INTEGER NOT NULL,
    vms_live INTEGER NOT NULL,
    PRIMARY KEY (node_id, time)
);
CREATE INDEX node_load_time ON node_load (time);

-- Node events belong to the deployment, whose own tenant is `default` (the
-- tenant of the first key, the one with the `system` scope).
CREATE TRIGGER nodes_events_insert AFTER INSERT ON nodes
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 'default',
        'node.registered', 'node', NEW.id,
        json_object('host', NEW.host, 'roles', json(NEW.roles), 'version', NEW.version,
            'status', NEW.status));
END;

CREATE TRIGGER nodes_events_update AFTER UPDATE OF status, drain ON nodes
    WHEN OLD.status <> NEW.status OR OLD.drain <> NEW.drain
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 'default',
        CASE WHEN OLD.drain <> NEW.drain AND NEW.drain = 1 THEN 'node.draining'
             WHEN OLD.drain <> NEW.drain THEN 'node.resumed'
             WHEN NEW.status = 'lost' THEN 'node.lost'
             ELSE 'node.online' END,
        'node', NEW.id,
        json_object('host', NEW.host, 'status', NEW.status, 'last_seen', NEW.last_seen));
END;

-- A node that stops gracefully deletes its row; retention deletes only
-- nodes long lost, which said so already.
CREATE TRIGGER nodes_events_delete AFTER DELETE ON nodes
    WHEN OLD.status <> 'lost'
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 'default',
        'node.stopped', 'node', OLD.id, json_object('host', OLD.host));
END;
