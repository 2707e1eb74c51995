-- The dashboard's figures, kept up to date by the database itself (see the
-- PostgreSQL migration of the same number for the design). One connection
-- writes, so there is one shard (0); row triggers fire only on the changes
-- they count, and a heartbeat (no change of status) fires none. The tables
-- are clustered on their keys (WITHOUT ROWID): an upsert touches one
-- B-tree, and a read of a tenant's week is one range scan.

-- Latency buckets: bucket 0 holds durations below 1 ms; bucket b (1..70)
-- holds [bound(b), bound(b + 1)), ten per decade. A bucket is one probe of
-- this table's integer key. Duplicated in kiln_db::dashboard::LATENCY_BOUNDS.
CREATE TABLE latency_buckets (
    lo INTEGER PRIMARY KEY,
    bucket INTEGER NOT NULL
);
INSERT INTO latency_buckets (lo, bucket) VALUES
    (-9223372036854775807, 0),
    (1, 1),
    (2, 2),
    (3, 3),
    (4, 4),
    (5, 5),
    (6, 6),
    (8, 7),
    (10, 8),
    (13, 9),
    (16, 10),
    (20, 11),
    (25, 12),
    (32, 13),
    (40, 14),
    (50, 15),
    (63, 16),
    (79, 17),
    (100, 18),
    (126, 19),
    (158, 20),
    (200, 21),
    (251, 22),
    (316, 23),
    (398, 24),
    (501, 25),
    (631, 26),
    (794, 27),
    (1000, 28),
    (1259, 29),
    (1585, 30),
    (1995, 31),
    (2512, 32),
    (3162, 33),
    (3981, 34),
    (5012, 35),
    (6310, 36),
    (7943, 37),
    (10000, 38),
    (12589, 39),
    (15849, 40),
    (19953, 41),
    (25119, 42),
    (31623, 43),
    (39811, 44),
    (50119, 45),
    (63096, 46),
    (79433, 47),
    (100000, 48),
    (125893, 49),
    (158489, 50),
    (199526, 51),
    (251189, 52),
    (316228, 53),
    (398107, 54),
    (501187, 55),
    (630957, 56),
    (794328, 57),
    (1000000, 58),
    (1258925, 59),
    (1584893, 60),
    (1995262, 61),
    (2511886, 62),
    (3162278, 63),
    (3981072, 64),
    (5011872, 65),
    (6309573, 66),
    (7943282, 67),
    (10000000, 68),
    (12589254, 69),
    (15848932, 70);

CREATE TABLE job_rollups (
    tenant TEXT NOT NULL,
    minute INTEGER NOT NULL,
    kind TEXT NOT NULL,
    queue TEXT NOT NULL,
    shard INTEGER NOT NULL,
    enqueued INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, minute, kind, queue, shard)
) WITHOUT ROWID;
CREATE INDEX job_rollups_minute ON job_rollups (minute);

CREATE TABLE job_latency (
    tenant TEXT NOT NULL,
    minute INTEGER NOT NULL,
    metric INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, minute, metric, bucket, shard)
) WITHOUT ROWID;
CREATE INDEX job_latency_minute ON job_latency (minute);

CREATE TABLE queue_waiting (
    tenant TEXT NOT NULL,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    shard INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, queue, status, shard)
) WITHOUT ROWID;

INSERT INTO queue_waiting (tenant, queue, status, shard, n)
    SELECT tenant, queue, status, 0, COUNT(*) FROM jobs
    WHERE status IN ('queued', 'scheduled') GROUP BY tenant, queue, status;
INSERT INTO job_rollups (tenant, minute, kind, queue, shard, enqueued)
    SELECT tenant, created_at / 3600000 * 3600000, kind, queue, 0, COUNT(*) FROM jobs
    GROUP BY 1, 2, 3, 4;
INSERT INTO job_rollups (tenant, minute, kind, queue, shard, succeeded, failed, dead, cancelled)
    SELECT tenant, finished_at / 3600000 * 3600000, kind, queue, 0,
        SUM(status = 'succeeded'), SUM(status = 'failed'), SUM(status = 'dead'),
        SUM(status = 'cancelled')
    FROM jobs WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled') GROUP BY 1, 2, 3, 4
    ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
        succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed,
        dead = dead + excluded.dead, cancelled = cancelled + excluded.cancelled;
INSERT INTO job_latency (tenant, minute, metric, bucket, shard, n)
    SELECT tenant, minute, 1, bucket, 0, COUNT(*) FROM (
        SELECT j.tenant, j.finished_at / 3600000 * 3600000 AS minute,
            (SELECT b.bucket FROM latency_buckets b WHERE b.lo <= j.finished_at - j.started_at
             ORDER BY b.lo DESC LIMIT 1) AS bucket
        FROM jobs j WHERE j.status IN ('succeeded', 'failed', 'dead', 'cancelled')
        AND j.started_at IS NOT NULL)
    GROUP BY tenant, minute, bucket;

CREATE TRIGGER jobs_rollups_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_rollups (tenant, minute, kind, queue, shard, enqueued)
        VALUES (NEW.tenant, NEW.created_at / 60000 * 60000, NEW.kind, NEW.queue, 0, 1)
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET enqueued = enqueued + 1;
    INSERT INTO queue_waiting (tenant, queue, status, shard, n)
        SELECT NEW.tenant, NEW.queue, NEW.status, 0, 1 WHERE NEW.status IN ('queued', 'scheduled')
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER jobs_rollups_start AFTER UPDATE OF status ON jobs
    WHEN NEW.status = 'running' AND OLD.status <> 'running'
BEGIN
    INSERT INTO job_rollups (tenant, minute, kind, queue, shard, started)
        VALUES (NEW.tenant, NEW.started_at / 60000 * 60000, NEW.kind, NEW.queue, 0, 1)
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET started = started + 1;
    INSERT INTO job_latency (tenant, minute, metric, bucket, shard, n)
        SELECT NEW.tenant, NEW.started_at / 60000 * 60000, 0,
            (SELECT b.bucket FROM latency_buckets b WHERE b.lo <= NEW.started_at - OLD.run_at
             ORDER BY b.lo DESC LIMIT 1), 0, 1
        WHERE OLD.attempt = 0
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = n + 1;
    UPDATE queue_waiting SET n = n - 1
        WHERE OLD.status IN ('queued', 'scheduled')
        AND tenant = OLD.tenant AND queue = OLD.queue AND status = OLD.status AND shard = 0;
END;

CREATE TRIGGER jobs_rollups_end AFTER UPDATE OF status ON jobs
    WHEN NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled') AND OLD.status <> NEW.status
BEGIN
    INSERT INTO job_rollups (tenant, minute, kind, queue, shard, succeeded, failed, dead, cancelled)
        VALUES (NEW.tenant, NEW.finished_at / 60000 * 60000, NEW.kind, NEW.queue, 0,
            NEW.status = 'succeeded', NEW.status = 'failed', NEW.status = 'dead',
            NEW.status = 'cancelled')
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET
            succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed,
            dead = dead + excluded.dead, cancelled = cancelled + excluded.cancelled;
    INSERT INTO job_latency (tenant, minute, metric, bucket, shard, n)
        SELECT NEW.tenant, NEW.finished_at / 60000 * 60000, 1,
            (SELECT b.bucket FROM latency_buckets b WHERE b.lo <= NEW.finished_at - NEW.started_at
             ORDER BY b.lo DESC LIMIT 1), 0, 1
        WHERE OLD.status = 'running'
        ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = n + 1;
    UPDATE queue_waiting SET n = n - 1
        WHERE OLD.status IN ('queued', 'scheduled')
        AND tenant = OLD.tenant AND queue = OLD.queue AND status = OLD.status AND shard = 0;
END;

-- Back to waiting: a retry (automatic or by hand), a lost lease, a release.
CREATE TRIGGER jobs_rollups_wait AFTER UPDATE OF status ON jobs
    WHEN NEW.status IN ('queued', 'scheduled') AND OLD.status <> NEW.status
BEGIN
    INSERT INTO job_rollups (tenant, minute, kind, queue, shard, retried)
        SELECT NEW.tenant,
            CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) / 60000 * 60000,
            NEW.kind, NEW.queue, 0, 1
        WHERE OLD.status NOT IN ('queued', 'scheduled')
        ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET retried = retried + 1;
    INSERT INTO queue_waiting (tenant, queue, status, shard, n)
        VALUES (NEW.tenant, NEW.queue, NEW.status, 0, 1)
        ON CONFLICT (tenant, queue, status, shard) DO UPDATE SET n = n + 1;
    UPDATE queue_waiting SET n = n - 1
        WHERE OLD.status IN ('queued', 'scheduled')
        AND tenant = OLD.tenant AND queue = OLD.queue AND status = OLD.status AND shard = 0;
END;

CREATE TRIGGER jobs_rollups_delete AFTER DELETE ON jobs
    WHEN OLD.status IN ('queued', 'scheduled')
BEGIN
    UPDATE queue_waiting SET n = n - 1
        WHERE tenant = OLD.tenant AND queue = OLD.queue AND status = OLD.status AND shard = 0;
END;
