-- The dashboard's figures, kept up to date by the database itself: per
-- minute and per tenant, kind and queue, how many jobs were enqueued,
-- started, ended in each final state and went back to wait; per minute and
-- tenant, histograms of enqueue→start latency and run time; per tenant and
-- queue, how many jobs wait now. Statement-level triggers turn each
-- statement's transition tables into one upsert per table, so a batch of
-- 4,000 completions costs one join and a few rows, and every path that
-- moves a job (insert, lease, completion, cancel, retry, rescue, release,
-- delete, any later one) keeps the figures exact. Hot rows are spread over
-- 16 shards by connection, as tenant_running is (0004); readers sum them.
--
-- A row's minute is the start of the minute (milliseconds since the epoch)
-- in which the change happened, by the job's own timestamps: created_at
-- for an enqueue, started_at for a start, finished_at for an end; the
-- database's clock for a return to waiting. The retention pass folds
-- minutes older than an hour into one row per hour (minute = the hour's
-- start, shard 0) and deletes rows past the retention.

-- Latency buckets: bucket 0 holds durations below 1 ms; bucket b (1..70)
-- holds [bound(b), bound(b + 1)), ten per decade (10^(k/10) rounded, the
-- duplicates below 10 ms dropped), up to 15,848,932 ms (4.4 hours) and
-- beyond in bucket 70. Duplicated in kiln_db::dashboard::LATENCY_BOUNDS.
CREATE FUNCTION kiln_latency_bucket(d BIGINT) RETURNS INTEGER LANGUAGE sql IMMUTABLE AS
    $$ SELECT width_bucket(d, '{1,2,3,4,5,6,8,10,13,16,20,25,32,40,50,63,79,100,126,158,200,251,316,398,501,631,794,1000,1259,1585,1995,2512,3162,3981,5012,6310,7943,10000,12589,15849,19953,25119,31623,39811,50119,63096,79433,100000,125893,158489,199526,251189,316228,398107,501187,630957,794328,1000000,1258925,1584893,1995262,2511886,3162278,3981072,5011872,6309573,7943282,10000000,12589254,15848932}'::bigint[]) $$;

CREATE TABLE job_rollups (
    tenant TEXT NOT NULL,
    minute BIGINT NOT NULL,
    kind TEXT NOT NULL,
    queue TEXT NOT NULL,
    shard SMALLINT NOT NULL,
    enqueued BIGINT NOT NULL DEFAULT 0,
    started BIGINT NOT NULL DEFAULT 0,
    succeeded BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    dead BIGINT NOT NULL DEFAULT 0,
    cancelled BIGINT NOT NULL DEFAULT 0,
    retried BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, minute, kind, queue, shard)
);
-- Deployment-wide reads, folding and pruning go by time.
CREATE INDEX job_rollups_minute ON job_rollups (minute);

-- metric 0: enqueue→start, from when the job was due (run_at) to its first
-- start; metric 1: run time of the attempt that ended the job.
CREATE TABLE job_latency (
    tenant TEXT NOT NULL,
    minute BIGINT NOT NULL,
    metric SMALLINT NOT NULL,
    bucket SMALLINT NOT NULL,
    shard SMALLINT NOT NULL,
    n BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, minute, metric, bucket, shard)
);
CREATE INDEX job_latency_minute ON job_latency (minute);

-- Jobs waiting now (queued or scheduled) per tenant, queue and status.
CREATE TABLE queue_waiting (
    tenant TEXT NOT NULL,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    shard SMALLINT NOT NULL,
    n BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, queue, status, shard)
);

INSERT INTO queue_waiting (tenant, queue, status, shard, n)
    SELECT tenant, queue, status, 0, COUNT(*) FROM jobs
    WHERE status IN ('queued', 'scheduled') GROUP BY tenant, queue, status;
-- What the jobs table still tells of the days before: enqueues, final
-- states and the run time of finished jobs.
INSERT INTO job_rollups (tenant, minute, kind, queue, shard, enqueued)
    SELECT tenant, created_at / 3600000 * 3600000, kind, queue, 0, COUNT(*) FROM jobs
    GROUP BY 1, 2, 3, 4;
INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, succeeded, failed, dead, cancelled)
    SELECT tenant, finished_at / 3600000 * 3600000, kind, queue, 0,
        COUNT(*) FILTER (WHERE status = 'succeeded'), COUNT(*) FILTER (WHERE status = 'failed'),
        COUNT(*) FILTER (WHERE status = 'dead'), COUNT(*) FILTER (WHERE status = 'cancelled')
    FROM jobs WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled') GROUP BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
        succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed,
        dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled;
INSERT INTO job_latency (tenant, minute, metric, bucket, shard, n)
    SELECT tenant, finished_at / 3600000 * 3600000, 1, kiln_latency_bucket(finished_at - started_at), 0,
        COUNT(*)
    FROM jobs WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled') AND started_at IS NOT NULL
    GROUP BY 1, 2, 4;

CREATE FUNCTION kiln_rollups_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
BEGIN
    INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, enqueued)
        SELECT tenant, created_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
        FROM new_rows GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET enqueued = r.enqueued + excluded.enqueued;
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, COUNT(*) FROM new_rows
        WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_rollups_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard SMALLINT := (pg_backend_pid() % 16)::smallint;
    now_minute BIGINT := kiln_now_ms() / 60000 * 60000;
BEGIN
    -- The queue's own statements each move rows one way, so what changed
    -- is read from one transition table, with no join: a lease heartbeat
    -- (running before and after, thousands of rows every few seconds)
    -- changes nothing; an end of attempts (completion, rescue, release)
    -- finds every old row running; a lease finds every old row waiting and
    -- every new one running (a lease adds 1 to attempt and keeps run_at).
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status <> 'running') THEN
        IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status <> 'running') THEN
            RETURN NULL;
        END IF;
        WITH ended AS MATERIALIZED (
            SELECT tenant, kind, queue, status, started_at, finished_at FROM new_rows
            WHERE status <> 'running'
        ), counted AS (
            INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, succeeded, failed,
                dead, cancelled, retried)
            SELECT tenant, minute, kind, queue, my_shard,
                COUNT(*) FILTER (WHERE status = 'succeeded'), COUNT(*) FILTER (WHERE status = 'failed'),
                COUNT(*) FILTER (WHERE status = 'dead'), COUNT(*) FILTER (WHERE status = 'cancelled'),
                COUNT(*) FILTER (WHERE status IN ('queued', 'scheduled'))
            FROM (SELECT tenant, kind, queue, status,
                    CASE WHEN status IN ('queued', 'scheduled') THEN now_minute
                         ELSE finished_at / 60000 * 60000 END AS minute
                  FROM ended) e
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
                succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed,
                dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled,
                retried = r.retried + excluded.retried
        ), timed AS (
            INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
            SELECT tenant, finished_at / 60000 * 60000, 1, kiln_latency_bucket(finished_at - started_at),
                my_shard, COUNT(*)
            FROM ended WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled')
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n
        )
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, COUNT(*) FROM ended
        WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status NOT IN ('queued', 'scheduled'))
        AND NOT EXISTS (SELECT 1 FROM new_rows WHERE status <> 'running') THEN
        WITH counted AS (
            INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, started)
            SELECT tenant, started_at / 60000 * 60000, kind, queue, my_shard, COUNT(*)
            FROM new_rows GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
                started = r.started + excluded.started
        ), timed AS (
            INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n)
            SELECT tenant, started_at / 60000 * 60000, 0, kiln_latency_bucket(started_at - run_at),
                my_shard, COUNT(*)
            FROM new_rows WHERE attempt = 1
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n
        )
        INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, my_shard, -COUNT(*) FROM old_rows
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
        RETURN NULL;
    END IF;
    -- Anything else (a cancel, a retry by hand, a change of many jobs of a
    -- queue): the join of the transition tables, made once.
    WITH moved AS MATERIALIZED (
        SELECT n.tenant, n.kind, n.queue, o.status AS old_status, n.status AS new_status,
            o.attempt AS was_attempt, o.run_at AS was_run_at, n.started_at, n.finished_at
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status <> n.status
    ), counted AS (
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
            cancelled = r.cancelled + excluded.cancelled, retried = r.retried + excluded.retried
    ), timed AS (
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
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n
    )
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
    SELECT tenant, queue, status, my_shard, SUM(d) FROM (
        SELECT tenant, queue, new_status AS status, 1 AS d FROM moved WHERE new_status IN ('queued', 'scheduled')
        UNION ALL
        SELECT tenant, queue, old_status, -1 FROM moved WHERE old_status IN ('queued', 'scheduled')
    ) m
    GROUP BY 1, 2, 3 HAVING SUM(d) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_rollups_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue_waiting AS w (tenant, queue, status, shard, n)
        SELECT tenant, queue, status, (pg_backend_pid() % 16)::smallint, -COUNT(*) FROM old_rows
        WHERE status IN ('queued', 'scheduled') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = w.n + excluded.n;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_rollups_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_rollups_insert();
CREATE TRIGGER jobs_rollups_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_rollups_update();
CREATE TRIGGER jobs_rollups_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_rollups_delete();
