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

-- The end of attempts writes, when every end is final and none goes to the
-- flow outbox (a pipeline step's end its own transaction advances, a plain
-- job's end), a statement without the outbox's and the waiting count's
-- inserts: each insert costs an executor start-up even when it writes
-- nothing. What is written is unchanged.
CREATE OR REPLACE FUNCTION kiln_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
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
    any_back BOOLEAN;
    any_outbox BOOLEAN;
    n BIGINT;
BEGIN
    -- The queue's own statements each move rows one way, so one look at
    -- each transition table tells which: a heartbeat (running before and
    -- after) changes nothing, an end of attempts finds every old row
    -- running, a lease every old row waiting and every new one running.
    taken := string_to_array(NULLIF(current_setting('kiln.outbox_taken', true), ''), ',')::int8[];
    SELECT o.running, o.waiting, j.running, j.back, j.outbox
    INTO old_running, old_waiting, new_running, any_back, any_outbox
    FROM (SELECT COALESCE(bool_and(status = 'running'), true) AS running,
                 COALESCE(bool_and(status IN ('queued', 'scheduled')), true) AS waiting
          FROM old_rows) o,
         (SELECT COALESCE(bool_and(status = 'running'), true) AS running,
                 COALESCE(bool_or(status IN ('queued', 'scheduled')), false) AS back,
                 COALESCE(bool_or(run_id IS NOT NULL
                     AND status IN ('succeeded', 'failed', 'cancelled', 'dead')
                     AND NOT COALESCE(id = ANY(taken), false)), false) AS outbox
          FROM new_rows) j;
    IF old_running AND new_running THEN
        RETURN NULL;
    END IF;
    IF old_running AND NOT any_back AND NOT any_outbox THEN
        -- Ends of attempts, every one final and none for the flow outbox
        -- (a step's end its own transaction advances): the statement below
        -- without its two inserts that would write nothing.
        PERFORM pg_advisory_xact_lock(1802071150, my_shard);
        WITH ended AS (
            SELECT * FROM new_rows WHERE status <> 'running'
        ), ev AS (
            INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data)
            SELECT now_ms, j.tenant, 'job.' || j.status, 'job', j.id::text, j.labels,
                json_build_object('kind', j.kind, 'queue', j.queue, 'status', j.status,
                    'attempt', j.attempt, 'run_id', j.run_id, 'error', left(j.error, 512))::text
            FROM ended j WHERE events_on
        ), running AS (
            INSERT INTO tenant_running AS t (tenant, shard, n)
            SELECT tenant, my_shard, -COUNT(*) FROM ended GROUP BY tenant ORDER BY tenant
            ON CONFLICT (tenant, shard) DO UPDATE SET n = t.n + excluded.n
        ), rollups AS (
            INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, succeeded, failed,
                dead, cancelled)
            SELECT tenant, finished_at / 60000 * 60000, kind, queue, my_shard,
                COUNT(*) FILTER (WHERE status = 'succeeded'), COUNT(*) FILTER (WHERE status = 'failed'),
                COUNT(*) FILTER (WHERE status = 'dead'), COUNT(*) FILTER (WHERE status = 'cancelled')
            FROM ended WHERE rollups_on
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
                succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed,
                dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled
        )
        INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
        SELECT tenant, finished_at / 60000 * 60000, 1, kiln_latency_bucket(finished_at - started_at),
            my_shard, COUNT(*)
        FROM ended WHERE rollups_on
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n;
        IF events_on THEN
            PERFORM pg_notify('kiln_events', '');
        END IF;
        RETURN NULL;
    END IF;
    IF old_running THEN
        -- Ends of attempts: every new row that is not running moved, to an
        -- end or back to waiting (a retry).
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
