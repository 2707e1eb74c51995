-- A pipeline's next step job can be inserted already leased to the worker
-- whose completion made it, in the statement that writes the run's rows
-- (`FlowTx::put_rows_inserting`): one write of the job row in place of an
-- insert and an update, one trigger call in place of two, one trip fewer.
-- The insert trigger now writes, for a row inserted running, what the
-- lease would have written after the insert: the `job.started` event after
-- its `job.queued`, the tenant's running count, the rollup's start and the
-- start latency. A row inserted running never counted as waiting. The
-- `job.queued` event of such a row shows the job as it was queued (status
-- `queued`, attempt 0).

CREATE OR REPLACE FUNCTION kiln_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    now_ms BIGINT := kiln_now_ms();
    events_on BOOLEAN := NOT COALESCE('no_events' = ANY(TG_ARGV), false);
    rollups_on BOOLEAN := NOT COALESCE('no_rollups' = ANY(TG_ARGV), false);
    leased BOOLEAN;
    n BIGINT;
BEGIN
    -- A pipeline step's insert that its own transaction leases says so;
    -- waking every listener for it would only send each looking for it.
    IF current_setting('kiln.quiet_insert', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('kiln_jobs', '');
    END IF;
    leased := EXISTS (SELECT 1 FROM new_rows WHERE status = 'running');
    IF NOT leased THEN
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
    END IF;
    -- Some rows were inserted leased: their start is written with their
    -- creation, in the order a lease after the insert would have left.
    PERFORM pg_advisory_xact_lock(1802071150, my_shard);
    WITH ev AS (
        INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
        SELECT now_ms, e.tenant, e.type, 'job', e.id::text, e.labels, e.data FROM (
            SELECT j.id, 0 AS k, j.tenant, 'job.queued' AS type, j.labels,
                json_build_object('kind', j.kind, 'queue', j.queue,
                    'status', CASE WHEN j.status = 'running' THEN 'queued' ELSE j.status END,
                    'attempt', CASE WHEN j.status = 'running' THEN j.attempt - 1 ELSE j.attempt END,
                    'run_id', j.run_id)::text AS data
            FROM new_rows j
            UNION ALL
            SELECT j.id, 1, j.tenant, 'job.started', j.labels,
                json_build_object('kind', j.kind, 'queue', j.queue, 'status', j.status,
                    'attempt', j.attempt, 'run_id', j.run_id, 'error', left(j.error, 512))::text
            FROM new_rows j WHERE j.status = 'running'
        ) e
        WHERE events_on
        ORDER BY e.k, e.id
    ), running AS (
        INSERT INTO tenant_running AS t (tenant, shard, n)
        SELECT tenant, my_shard, COUNT(*) FROM new_rows WHERE status = 'running'
        GROUP BY tenant ORDER BY tenant
        ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n
    ), waiting AS (
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, COUNT(*) FROM new_rows
        WHERE rollups_on AND status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n
    ), rollups AS (
        INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, enqueued, started)
        SELECT tenant, minute, kind, queue, my_shard, SUM(enqueued), SUM(started) FROM (
            SELECT tenant, created_at / 60000 * 60000 AS minute, kind, queue, 1 AS enqueued,
                0 AS started
            FROM new_rows
            UNION ALL
            SELECT tenant, started_at / 60000 * 60000, kind, queue, 0, 1
            FROM new_rows WHERE status = 'running'
        ) c
        WHERE rollups_on
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
            enqueued = r.enqueued + excluded.enqueued, started = r.started + excluded.started
    )
    INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
    SELECT tenant, started_at / 60000 * 60000, 0, kiln_latency_bucket(started_at - run_at),
        my_shard, COUNT(*)
    FROM new_rows WHERE rollups_on AND status = 'running' AND attempt = 1
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
    IF events_on THEN
        PERFORM pg_notify('kiln_events', '');
    END IF;
    RETURN NULL;
END $$;
