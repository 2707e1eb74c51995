-- Incidents: what the detectors (`kiln_ops::incidents`) open from the event
-- log. One open incident per (tenant, fingerprint); a repeat adds to its
-- timeline instead of opening another. Changes of status are events, by
-- trigger, in the change's transaction, so subscriptions can notify.
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    title TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    occurrences INTEGER NOT NULL DEFAULT 1,
    opened_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    resolved_at INTEGER,
    resolved_by TEXT CHECK (resolved_by IN ('manual', 'automatic')),
    notes TEXT
);
CREATE UNIQUE INDEX incidents_open ON incidents (tenant, fingerprint) WHERE status <> 'resolved';
CREATE INDEX incidents_tenant ON incidents (tenant, id);
CREATE INDEX incidents_kind_open ON incidents (kind, updated_at) WHERE status <> 'resolved';

CREATE TABLE incident_timeline (
    incident_id INTEGER NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    event_id INTEGER,
    entry TEXT NOT NULL
);
CREATE INDEX incident_timeline_incident ON incident_timeline (incident_id, seq);

CREATE TRIGGER incidents_events_insert AFTER INSERT ON incidents
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'incident.opened', 'incident', CAST(NEW.id AS TEXT),
        json_object('kind', NEW.kind, 'severity', NEW.severity, 'title', NEW.title,
            'fingerprint', NEW.fingerprint));
END;

CREATE TRIGGER incidents_events_update AFTER UPDATE OF status ON incidents
    WHEN OLD.status <> NEW.status
BEGIN
    INSERT INTO events (time, tenant, type, resource_kind, resource_id, data)
    VALUES (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.tenant,
        'incident.' || NEW.status, 'incident', CAST(NEW.id AS TEXT),
        json_object('kind', NEW.kind, 'severity', NEW.severity, 'title', NEW.title,
            'resolved_by', NEW.resolved_by));
END;
