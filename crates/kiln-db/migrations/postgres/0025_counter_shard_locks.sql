-- Every trigger that writes the sharded counters (queue_waiting,
-- job_rollups, job_latency, tenant_running) first takes its shard's
-- transaction-level advisory lock. Ordering the rows inside one statement
-- (0023) did not order them across a transaction's statements: a step's
-- completion writes the rollup row (the end) before the waiting count (the
-- next step's insert), a lease on another connection of the same shard the
-- other way round, and PostgreSQL aborted one of them after its deadlock
-- timeout. Two transactions of one shard now meet at the lock, before any
-- counter row, and the later waits for the earlier to end. Statements that
-- change no count (a heartbeat) take nothing.

CREATE OR REPLACE FUNCTION kiln_rollups_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
BEGIN
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, COUNT(*) FROM new_rows
        WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, enqueued)
        SELECT tenant, created_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
        FROM new_rows GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET enqueued = r.enqueued + excluded.enqueued;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION kiln_rollups_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    now_minute BIGINT := kiln_now_ms() / 60000 * 60000;
BEGIN
    -- The queue's own statements each move rows one way, so what changed
    -- is read from one transition table, with no join: a lease heartbeat
    -- (running before and after) changes nothing; an end of attempts
    -- finds every old row running; a lease finds every old row waiting and
    -- every new one running.
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status <> 'running') THEN
        IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status <> 'running') THEN
            RETURN NULL;
        END IF;
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
            SELECT tenant, queue, status, my_shard, COUNT(*) FROM new_rows
            WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
        INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, succeeded, failed,
            dead, cancelled, retried)
        SELECT tenant, minute, kind, queue, my_shard,
            COUNT(*) FILTER (WHERE status = 'succeeded'), COUNT(*) FILTER (WHERE status = 'failed'),
            COUNT(*) FILTER (WHERE status = 'dead'), COUNT(*) FILTER (WHERE status = 'cancelled'),
            COUNT(*) FILTER (WHERE status IN ('queued', 'scheduled'))
        FROM (SELECT tenant, kind, queue, status,
                CASE WHEN status IN ('queued', 'scheduled') THEN now_minute
                     ELSE finished_at / 60000 * 60000 END AS minute
              FROM new_rows WHERE status <> 'running') e
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
            succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed,
            dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled,
            retried = r.retried + excluded.retried;
        INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
        SELECT tenant, finished_at / 60000 * 60000, 1, kiln_latency_bucket(finished_at - started_at),
            my_shard, COUNT(*)
        FROM new_rows WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled')
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status NOT IN ('queued', 'scheduled'))
        AND NOT EXISTS (SELECT 1 FROM new_rows WHERE status <> 'running') THEN
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, -COUNT(*) FROM old_rows
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
        INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, started)
        SELECT tenant, started_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
        FROM new_rows GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
            started = r.started + excluded.started;
        INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
        SELECT tenant, started_at / 60000 * 60000, 0, kiln_latency_bucket(started_at - run_at),
            my_shard, COUNT(*)
        FROM new_rows WHERE attempt = 1
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status <> n.status) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    -- Anything else (a cancel, a retry by hand, a change of many jobs of a
    -- queue): the join of the transition tables, in each statement (rare
    -- paths; the order of the writes is what matters).
    WITH moved AS (
        SELECT n.tenant, n.kind, n.queue, o.status AS old_status, n.status AS new_status,
            o.attempt AS was_attempt, o.run_at AS was_run_at, n.started_at, n.finished_at
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status <> n.status
    )
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
    SELECT tenant, queue, status, my_shard, SUM(d) FROM (
        SELECT tenant, queue, new_status AS status, 1 AS d FROM moved WHERE new_status IN ('queued', 'scheduled')
        UNION ALL
        SELECT tenant, queue, old_status, -1 FROM moved WHERE old_status IN ('queued', 'scheduled')
    ) m
    GROUP BY 1, 2, 3 HAVING SUM(d) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    WITH moved AS (
        SELECT n.tenant, n.kind, n.queue, o.status AS old_status, n.status AS new_status,
            o.attempt AS was_attempt, o.run_at AS was_run_at, n.started_at, n.finished_at
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status <> n.status
    )
    INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, started, succeeded,
        failed, dead, cancelled, retried)
    SELECT tenant, minute, kind, queue, my_shard,
        COUNT(*) FILTER (WHERE new_status = 'running'), COUNT(*) FILTER (WHERE new_status = 'succeeded'),
        COUNT(*) FILTER (WHERE new_status = 'failed'), COUNT(*) FILTER (WHERE new_status = 'dead'),
        COUNT(*) FILTER (WHERE new_status = 'cancelled'),
        COUNT(*) FILTER (WHERE new_status IN ('queued', 'scheduled'))
    FROM (SELECT tenant, kind, queue, new_status,
            CASE WHEN new_status = 'running' THEN started_at
                 WHEN new_status IN ('queued', 'scheduled') THEN now_minute
                 ELSE finished_at END / 60000 * 60000 AS minute
          FROM moved
          WHERE NOT (new_status IN ('queued', 'scheduled') AND old_status IN ('queued', 'scheduled'))) e
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
        started = r.started + excluded.started, succeeded = r.succeeded + excluded.succeeded,
        failed = r.failed + excluded.failed, dead = r.dead + excluded.dead,
        cancelled = r.cancelled + excluded.cancelled, retried = r.retried + excluded.retried;
    WITH moved AS (
        SELECT n.tenant, n.kind, n.queue, o.status AS old_status, n.status AS new_status,
            o.attempt AS was_attempt, o.run_at AS was_run_at, n.started_at, n.finished_at
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status <> n.status
    )
    INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
    SELECT tenant, minute, metric, kiln_latency_bucket(d), my_shard, COUNT(*) FROM (
        SELECT tenant, started_at / 60000 * 60000 AS minute, 0 AS metric,
            started_at - was_run_at AS d
        FROM moved WHERE new_status = 'running' AND was_attempt = 0
        UNION ALL
        SELECT tenant, finished_at / 60000 * 60000, 1, finished_at - started_at
        FROM moved WHERE old_status = 'running' AND new_status IN ('succeeded', 'failed', 'dead', 'cancelled')
    ) t
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION kiln_rollups_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status IN ('queued', 'scheduled')) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, -COUNT(*) FROM old_rows
        WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION kiln_tenant_running_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM (
            SELECT tenant, 1 AS d FROM new_rows WHERE status = 'running'
            UNION ALL
            SELECT tenant, -1 AS d FROM old_rows WHERE status = 'running') AS moved
        GROUP BY tenant HAVING SUM(d) <> 0) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    -- Sorted by tenant, so two statements that touch the same tenants lock
    -- their rows in the same order.
    INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, my_shard, SUM(d) FROM (
            SELECT tenant, 1 AS d FROM new_rows WHERE status = 'running'
            UNION ALL
            SELECT tenant, -1 AS d FROM old_rows WHERE status = 'running') AS moved
        GROUP BY tenant HAVING SUM(d) <> 0 ORDER BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION kiln_tenant_running_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status = 'running') THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, my_shard, -COUNT(*) FROM old_rows
        WHERE status = 'running' GROUP BY tenant ORDER BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END $$;
