-- Queues belong to tenants: each tenant's pause and limit apply to its own
-- jobs in a queue of that name. A setting of the old shared queues is kept
-- for every tenant that has jobs in that queue.
CREATE TABLE tenant_queues (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    concurrency_limit INTEGER CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
INSERT INTO tenant_queues (tenant, name, paused, concurrency_limit, updated_at)
    SELECT DISTINCT j.tenant, q.name, q.paused, q.concurrency_limit, q.updated_at
    FROM queues q JOIN jobs j ON j.queue = q.name;
DROP TABLE queues;
ALTER TABLE tenant_queues RENAME TO queues;

-- True while the job's queue is paused or concurrency-limited. Such jobs are
-- leased only through their queue, so the main fetch index leaves them out
-- and a backlog in a paused queue costs the lease nothing.
ALTER TABLE jobs ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE jobs SET held = TRUE
    WHERE status IN ('queued','scheduled','running') AND EXISTS (
        SELECT 1 FROM queues q WHERE q.tenant = jobs.tenant AND q.name = jobs.queue
        AND (q.paused OR q.concurrency_limit IS NOT NULL));

-- The fetch index leads with the kind: a lease walks only the kinds its
-- worker handles, so a backlog of a kind nobody handles is never read.
DROP INDEX jobs_fetch;
CREATE INDEX jobs_fetch ON jobs (kind, priority, run_at, id)
    WHERE status IN ('queued','scheduled') AND NOT held;
-- Leasing a paused-or-limited queue, and pausing one, go through its jobs.
CREATE INDEX jobs_queue ON jobs (tenant, queue, priority, run_at, id)
    WHERE status IN ('queued','scheduled','running');
-- Running jobs by tenant and queue: the tenant quota and the queue limits
-- count them on every lease, and must not walk a queue's backlog to do so.
DROP INDEX jobs_running;
CREATE INDEX jobs_running ON jobs (tenant, queue, lease_expires_at) WHERE status = 'running';
-- Retention deletes the oldest finished jobs first.
CREATE INDEX jobs_finished ON jobs (finished_at)
    WHERE status IN ('succeeded','failed','cancelled','dead');
