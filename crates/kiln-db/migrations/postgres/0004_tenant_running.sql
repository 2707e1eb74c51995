-- Running jobs per tenant, kept by the database itself: the tenant quota
-- reads this row on every lease instead of counting running jobs. A
-- statement-level trigger turns each statement's transition tables into
-- one upsert per tenant whose count moved, so every path that starts or
-- ends a run (lease, completion, rescue, release, delete, any later one)
-- keeps it exact, and a heartbeat (running before and after) writes nothing.
-- Spread over 16 rows per tenant by connection, so leases and completions on
-- different connections never wait on one counter row; readers sum them.
CREATE TABLE tenant_running (
    tenant TEXT NOT NULL,
    shard SMALLINT NOT NULL,
    n BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, shard)
);
INSERT INTO tenant_running (tenant, shard, n)
    SELECT tenant, 0, COUNT(*) FROM jobs WHERE status = 'running' GROUP BY tenant;

CREATE FUNCTION kiln_tenant_running_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Sorted by tenant, so two statements that touch the same tenants lock
    -- their rows in the same order.
    INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, (pg_backend_pid() % 16)::smallint, SUM(d) FROM (
            SELECT tenant, 1 AS d FROM new_rows WHERE status = 'running'
            UNION ALL
            SELECT tenant, -1 AS d FROM old_rows WHERE status = 'running') AS moved
        GROUP BY tenant HAVING SUM(d) <> 0 ORDER BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_tenant_running_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, (pg_backend_pid() % 16)::smallint, -COUNT(*) FROM old_rows
        WHERE status = 'running' GROUP BY tenant ORDER BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_tenant_running_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_tenant_running_update();
CREATE TRIGGER jobs_tenant_running_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_tenant_running_delete();
