-- Incidents: what the detectors (`kiln_ops::incidents`) open from the event
-- log. One open incident per (tenant, fingerprint); a repeat adds to its
-- timeline instead of opening another. Changes of status are events, by
-- trigger, in the change's transaction, so subscriptions can notify.
CREATE TABLE incidents (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    title TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    occurrences INTEGER NOT NULL DEFAULT 1,
    opened_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT CHECK (resolved_by IN ('manual', 'automatic')),
    notes TEXT
);
CREATE UNIQUE INDEX incidents_open ON incidents (tenant, fingerprint) WHERE status <> 'resolved';
CREATE INDEX incidents_tenant ON incidents (tenant, id);
CREATE INDEX incidents_kind_open ON incidents (kind, updated_at) WHERE status <> 'resolved';

CREATE TABLE incident_timeline (
    incident_id BIGINT NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time BIGINT NOT NULL,
    event_id BIGINT,
    entry TEXT NOT NULL
);
CREATE INDEX incident_timeline_incident ON incident_timeline (incident_id, seq);

CREATE FUNCTION kiln_incident_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
        VALUES (kiln_now_ms(), NEW.tenant,
            CASE WHEN TG_OP = 'INSERT' THEN 'incident.opened' ELSE 'incident.' || NEW.status END,
            'incident', NEW.id::text,
            json_build_object('kind', NEW.kind, 'severity', NEW.severity, 'title', NEW.title,
                'fingerprint', NEW.fingerprint, 'resolved_by', NEW.resolved_by)::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER incidents_events AFTER INSERT OR UPDATE OF status ON incidents
    FOR EACH ROW EXECUTE FUNCTION kiln_incident_event();
