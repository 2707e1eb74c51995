-- Webhook triggers. `id` is the unguessable public id in the receiving URL
-- (POST /api/v1/hooks/{id}); names stay per tenant. The secret is kept as
-- given: verifying an HMAC needs it, so it cannot be hashed.
CREATE TABLE webhooks (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    secret TEXT NOT NULL,
    filters TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- One row per delivery received. A sender's delivery id is unique per
-- trigger, so the same delivery sent twice finds the first row instead of
-- starting again (rows without an id are never deduplicated).
CREATE TABLE webhook_deliveries (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    delivery TEXT,
    event TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    job_id BIGINT,
    run_id BIGINT,
    detail TEXT
);
CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (webhook_id, delivery);
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (webhook_id, seq);
