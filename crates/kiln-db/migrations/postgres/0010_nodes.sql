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
    cpu DOUBLE PRECISION,
    load1 DOUBLE PRECISION,
    mem_used DOUBLE PRECISION,
    mem_total_bytes BIGINT,
    status TEXT NOT NULL CHECK (status IN ('online', 'draining', 'lost')),
    drain BOOLEAN NOT NULL DEFAULT FALSE,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    lost_at BIGINT,
    CHECK ((status = 'lost') = (lost_at IS NOT NULL))
);
CREATE INDEX nodes_status_last_seen ON nodes (status, last_seen);

-- One row per heartbeat; each heartbeat deletes its node's rows past the
-- window, and the lost-node detector those of every node.
CREATE TABLE node_load (
    node_id TEXT NOT NULL,
    time BIGINT NOT NULL,
    cpu DOUBLE PRECISION,
    load1 DOUBLE PRECISION,
    mem_used DOUBLE PRECISION,
    slots_used INTEGER NOT NULL,
    vms_live INTEGER NOT NULL,
    PRIMARY KEY (node_id, time)
);
CREATE INDEX node_load_time ON node_load (time);

-- Node events belong to the deployment, whose own tenant is `default` (the
-- tenant of the first key, the one with the `system` scope).
CREATE FUNCTION kiln_events_nodes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), 'default', 'node.registered', 'node', NEW.id,
            json_build_object('host', NEW.host, 'roles', NEW.roles::json,
                'version', NEW.version, 'status', NEW.status)::text);
    ELSIF TG_OP = 'DELETE' THEN
        -- A node that stops gracefully deletes its row; retention deletes
        -- only nodes long lost, which said so already.
        IF OLD.status = 'lost' THEN
            RETURN NULL;
        END IF;
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), 'default', 'node.stopped', 'node', OLD.id,
            json_build_object('host', OLD.host)::text);
    ELSE
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), 'default',
            CASE WHEN OLD.drain <> NEW.drain AND NEW.drain THEN 'node.draining'
                 WHEN OLD.drain <> NEW.drain THEN 'node.resumed'
                 WHEN NEW.status = 'lost' THEN 'node.lost'
                 ELSE 'node.online' END,
            'node', NEW.id,
            json_build_object('host', NEW.host, 'status', NEW.status,
                'last_seen', NEW.last_seen)::text);
    END IF;
    PERFORM pg_notify('kiln_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER nodes_events_insert_delete AFTER INSERT OR DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION kiln_events_nodes();
-- Heartbeats update every row every few seconds; only a change of state
-- calls the function.
CREATE TRIGGER nodes_events_update AFTER UPDATE OF status, drain ON nodes
    FOR EACH ROW WHEN (OLD.status <> NEW.status OR OLD.drain <> NEW.drain)
    EXECUTE FUNCTION kiln_events_nodes();
