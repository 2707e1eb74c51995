-- Running jobs per tenant, kept by the database itself: the tenant quota
-- reads this row on every lease instead of counting running jobs. Triggers
-- fire only when a row enters or leaves `running`, so every path that starts
-- or ends a run keeps the count exact and a heartbeat writes nothing.
CREATE TABLE tenant_running (
    tenant TEXT PRIMARY KEY,
    n INTEGER NOT NULL DEFAULT 0
);
INSERT INTO tenant_running (tenant, n)
    SELECT tenant, COUNT(*) FROM jobs WHERE status = 'running' GROUP BY tenant;

CREATE TRIGGER jobs_tenant_running_start AFTER UPDATE OF status ON jobs
    WHEN NEW.status = 'running' AND OLD.status <> 'running'
BEGIN
    INSERT INTO tenant_running (tenant, n) VALUES (NEW.tenant, 1)
        ON CONFLICT (tenant) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_tenant_running_end AFTER UPDATE OF status ON jobs
    WHEN OLD.status = 'running' AND NEW.status <> 'running'
BEGIN
    UPDATE tenant_running SET n = n - 1 WHERE tenant = OLD.tenant;
END;
CREATE TRIGGER jobs_tenant_running_delete AFTER DELETE ON jobs
    WHEN OLD.status = 'running'
BEGIN
    UPDATE tenant_running SET n = n - 1 WHERE tenant = OLD.tenant;
END;
