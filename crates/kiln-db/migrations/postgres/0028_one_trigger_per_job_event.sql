-- One statement-level trigger per event on jobs, in place of three on
-- insert (wake-up, event, counters), four on update (event, flow outbox,
-- counters, running per tenant) and two on delete. Each trigger call and
-- each query in it costs an executor start-up, and a pipeline's chained
-- step moves three jobs' rows (its end, the next step's insert and lease):
-- the separate triggers ran about twenty queries a step, these run five.
-- What they write is unchanged:
-- * the event of every change of status (0006) and its wake-up;
-- * the flow outbox row of a step's end, but for jobs the statement named
--   in `kiln.outbox_taken` (0027);
-- * the sharded counters: waiting per queue, rollups per minute, latency
--   histograms (0014), running per tenant (0004), each written after the
--   shard's advisory lock (0025).
-- A trigger's arguments leave parts out: 'no_events' and 'no_rollups'
-- (queue_waiting, job_rollups and job_latency), for the benchmarks that
-- measure what those parts cost the queue.

DROP TRIGGER jobs_notify_insert ON jobs;
DROP TRIGGER jobs_events_insert ON jobs;
DROP TRIGGER jobs_rollups_insert ON jobs;
DROP TRIGGER jobs_events_update ON jobs;
DROP TRIGGER jobs_flow_outbox ON jobs;
DROP TRIGGER jobs_rollups_update ON jobs;
DROP TRIGGER jobs_tenant_running_update ON jobs;
DROP TRIGGER jobs_rollups_delete ON jobs;
DROP TRIGGER jobs_tenant_running_delete ON jobs;
DROP FUNCTION kiln_jobs_notify();
DROP FUNCTION kiln_events_jobs_insert();
DROP FUNCTION kiln_rollups_insert();
DROP FUNCTION kiln_events_jobs_update();
DROP FUNCTION kiln_flow_outbox();
DROP FUNCTION kiln_rollups_update();
DROP FUNCTION kiln_tenant_running_update();
DROP FUNCTION kiln_rollups_delete();
DROP FUNCTION kiln_tenant_running_delete();

CREATE FUNCTION kiln_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    now_ms BIGINT := kiln_now_ms();
    events_on BOOLEAN := NOT COALESCE('no_events' = ANY(TG_ARGV), false);
    rollups_on BOOLEAN := NOT COALESCE('no_rollups' = ANY(TG_ARGV), false);
    n BIGINT;
BEGIN
    -- A pipeline step's insert that its own transaction leases says so;
    -- waking every listener for it would only send each looking for it.
    IF current_setting('kiln.quiet_insert', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('kiln_jobs', '');
    END IF;
    IF rollups_on THEN
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    END IF;
    WITH ev AS (
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
        SELECT now_ms, j.tenant, 'job.queued', 'job', j.id::text, j.labels,
            json_build_object('kind', j.kind, 'queue', j.queue, 'status', j.status,
                'attempt', j.attempt, 'run_id', j.run_id)::text
        FROM new_rows j WHERE events_on
        RETURNING 1
    ), waiting AS (
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, COUNT(*) FROM new_rows
        WHERE rollups_on AND status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
    ), rollups AS (
        INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, enqueued)
        SELECT tenant, created_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
        FROM new_rows WHERE rollups_on GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET enqueued = r.enqueued + excluded.enqueued
    )
    SELECT COUNT(*) INTO n FROM ev;
    IF n > 0 THEN
        PERFORM pg_notify('kiln_events', '');
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    now_ms BIGINT := kiln_now_ms();
    now_minute BIGINT := now_ms / 60000 * 60000;
    events_on BOOLEAN := NOT COALESCE('no_events' = ANY(TG_ARGV), false);
    rollups_on BOOLEAN := NOT COALESCE('no_rollups' = ANY(TG_ARGV), false);
    taken int8[];
    old_running BOOLEAN;
    old_waiting BOOLEAN;
    new_running BOOLEAN;
    n BIGINT;
BEGIN
    -- The queue's own statements each move rows one way, so one look at
    -- each transition table tells which: a heartbeat (running before and
    -- after) changes nothing, an end of attempts finds every old row
    -- running, a lease every old row waiting and every new one running.
    SELECT o.running, o.waiting, j.running INTO old_running, old_waiting, new_running
    FROM (SELECT COALESCE(bool_and(status = 'running'), true) AS running,
                 COALESCE(bool_and(status IN ('queued', 'scheduled')), true) AS waiting
          FROM old_rows) o,
         (SELECT COALESCE(bool_and(status = 'running'), true) AS running FROM new_rows) j;
    IF old_running AND new_running THEN
        RETURN NULL;
    END IF;
    IF old_running THEN
        -- Ends of attempts: every new row that is not running moved, to an
        -- end or back to waiting (a retry).
        taken := string_to_array(NULLIF(current_setting('kiln.outbox_taken', true), ''), ',')::int8[];
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
        WITH ended AS (
            SELECT * FROM new_rows WHERE status <> 'running'
        ), ev AS (
            INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
            SELECT now_ms, j.tenant,
                CASE WHEN j.status IN ('queued', 'scheduled') THEN 'job.retried'
                     ELSE 'job.' || j.status END,
                'job', j.id::text, j.labels,
                json_build_object('kind', j.kind, 'queue', j.queue, 'status', j.status,
                    'attempt', j.attempt, 'run_id', j.run_id, 'error', left(j.error, 512))::text
            FROM ended j WHERE events_on
        ), outbox AS (
            INSERT INTO flow_outbox (run_id, job_id)
            SELECT j.run_id, j.id FROM ended j
            WHERE j.run_id IS NOT NULL AND j.status IN ('succeeded', 'failed', 'cancelled', 'dead')
            AND NOT COALESCE(j.id = ANY(taken), false)
            ORDER BY j.id
        ), running AS (
            INSERT INTO tenant_running AS t (tenant, shard, n)
            SELECT tenant, my_shard, -COUNT(*) FROM ended GROUP BY tenant ORDER BY tenant
            ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n
        ), waiting AS (
            INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
            SELECT tenant, queue, status, my_shard, COUNT(*) FROM ended
            WHERE rollups_on AND status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
        ), rollups AS (
            INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, succeeded, failed,
                dead, cancelled, retried)
            SELECT tenant, minute, kind, queue, my_shard,
                COUNT(*) FILTER (WHERE status = 'succeeded'), COUNT(*) FILTER (WHERE status = 'failed'),
                COUNT(*) FILTER (WHERE status = 'dead'), COUNT(*) FILTER (WHERE status = 'cancelled'),
                COUNT(*) FILTER (WHERE status IN ('queued', 'scheduled'))
            FROM (SELECT tenant, kind, queue, status,
                    CASE WHEN status IN ('queued', 'scheduled') THEN now_minute
                         ELSE finished_at / 60000 * 60000 END AS minute
                  FROM ended WHERE rollups_on) e
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
                succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed,
                dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled,
                retried = r.retried + excluded.retried
        )
        INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
        SELECT tenant, finished_at / 60000 * 60000, 1, kiln_latency_bucket(finished_at - started_at),
            my_shard, COUNT(*)
        FROM ended WHERE rollups_on AND status IN ('succeeded', 'failed', 'dead', 'cancelled')
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
        IF events_on THEN
            PERFORM pg_notify('kiln_events', '');
        END IF;
        RETURN NULL;
    END IF;
    IF old_waiting AND new_running THEN
        -- Leases: every row moved from waiting to running.
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
        WITH ev AS (
            INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
            SELECT now_ms, j.tenant, 'job.started', 'job', j.id::text, j.labels,
                json_build_object('kind', j.kind, 'queue', j.queue, 'status', j.status,
                    'attempt', j.attempt, 'run_id', j.run_id, 'error', left(j.error, 512))::text
            FROM new_rows j WHERE events_on
        ), running AS (
            INSERT INTO tenant_running AS t (tenant, shard, n)
            SELECT tenant, my_shard, COUNT(*) FROM new_rows GROUP BY tenant ORDER BY tenant
            ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n
        ), waiting AS (
            INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
            SELECT tenant, queue, status, my_shard, -COUNT(*) FROM old_rows
            WHERE rollups_on GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
        ), rollups AS (
            INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, started)
            SELECT tenant, started_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
            FROM new_rows WHERE rollups_on GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
                started = r.started + excluded.started
        )
        INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
        SELECT tenant, started_at / 60000 * 60000, 0, kiln_latency_bucket(started_at - run_at),
            my_shard, COUNT(*)
        FROM new_rows WHERE rollups_on AND attempt = 1
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
        IF events_on THEN
            PERFORM pg_notify('kiln_events', '');
        END IF;
        RETURN NULL;
    END IF;
    -- Anything else (a cancel, a retry by hand, a change of many jobs of a
    -- queue): the join of the transition tables (rare paths).
    IF NOT EXISTS (SELECT 1 FROM new_rows j JOIN old_rows o ON o.id = j.id
        WHERE o.status <> j.status) THEN
        RETURN NULL;
    END IF;
    taken := string_to_array(NULLIF(current_setting('kiln.outbox_taken', true), ''), ',')::int8[];
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    WITH moved AS (
        SELECT j.id, j.tenant, j.kind, j.queue, j.labels, j.attempt, j.run_id, j.error,
            o.status AS old_status, j.status AS new_status,
            o.attempt AS was_attempt, o.run_at AS was_run_at, j.started_at, j.finished_at
        FROM new_rows j JOIN old_rows o ON o.id = j.id
        WHERE o.status <> j.status
    ), ev AS (
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
        SELECT now_ms, m.tenant,
            CASE WHEN m.new_status = 'running' THEN 'job.started'
                 WHEN m.new_status IN ('queued', 'scheduled') THEN 'job.retried'
                 ELSE 'job.' || m.new_status END,
            'job', m.id::text, m.labels,
            json_build_object('kind', m.kind, 'queue', m.queue, 'status', m.new_status,
                'attempt', m.attempt, 'run_id', m.run_id, 'error', left(m.error, 512))::text
        FROM moved m WHERE events_on
    ), outbox AS (
        INSERT INTO flow_outbox (run_id, job_id)
        SELECT m.run_id, m.id FROM moved m
        WHERE m.run_id IS NOT NULL AND m.new_status IN ('succeeded', 'failed', 'cancelled', 'dead')
        AND m.old_status NOT IN ('succeeded', 'failed', 'cancelled', 'dead')
        AND NOT COALESCE(m.id = ANY(taken), false)
        ORDER BY m.id
    ), running AS (
        INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, my_shard, SUM(d) FROM (
            SELECT tenant, 1 AS d FROM moved WHERE new_status = 'running'
            UNION ALL
            SELECT tenant, -1 FROM moved WHERE old_status = 'running') r
        GROUP BY tenant HAVING SUM(d) <> 0 ORDER BY tenant
        ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n
    ), waiting AS (
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, SUM(d) FROM (
            SELECT tenant, queue, new_status AS status, 1 AS d FROM moved
            WHERE new_status IN ('queued', 'scheduled')
            UNION ALL
            SELECT tenant, queue, old_status, -1 FROM moved WHERE old_status IN ('queued', 'scheduled')
        ) m
        WHERE rollups_on
        GROUP BY 1, 2, 3 HAVING SUM(d) <> 0 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
    ), rollups AS (
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
              WHERE rollups_on
              AND NOT (new_status IN ('queued', 'scheduled') AND old_status IN ('queued', 'scheduled'))) e
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
            started = r.started + excluded.started, succeeded = r.succeeded + excluded.succeeded,
            failed = r.failed + excluded.failed, dead = r.dead + excluded.dead,
            cancelled = r.cancelled + excluded.cancelled, retried = r.retried + excluded.retried
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
    WHERE rollups_on
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
    IF events_on THEN
        PERFORM pg_notify('kiln_events', '');
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    rollups_on BOOLEAN := NOT COALESCE('no_rollups' = ANY(TG_ARGV), false);
BEGIN
    -- Retention deletes ended jobs, which no counter holds.
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status IN ('queued', 'scheduled', 'running')) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    WITH waiting AS (
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, -COUNT(*) FROM old_rows
        WHERE rollups_on AND status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
    )
    INSERT INTO tenant_running AS t (tenant, shard, n)
    SELECT tenant, my_shard, -COUNT(*) FROM old_rows
    WHERE status = 'running' GROUP BY tenant ORDER BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_jobs_inserted();
CREATE TRIGGER jobs_updated AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_jobs_updated();
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_jobs_deleted();
