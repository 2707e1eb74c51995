-- Where a job's result goes when it ends, for submissions that came through
-- a broker with a reply address (AMQP reply_to + correlation_id). A row
-- lives until the broker has confirmed the published result; deleting the
-- job deletes it. A publisher claims rows with a short lease so that two
-- kiln processes do not both publish the same result.
CREATE TABLE broker_replies (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    broker TEXT NOT NULL,
    reply_to TEXT NOT NULL,
    correlation_id TEXT,
    created_at INTEGER NOT NULL,
    lease_until INTEGER
);
CREATE INDEX broker_replies_broker ON broker_replies (broker, job_id);
