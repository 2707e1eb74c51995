-- Notification subscriptions: events matching `filter` are delivered to
-- `destination` by jobs of the built-in `notify` kind. `secret` (an HMAC
-- key or an API token) is never returned by any route and never copied into
-- a job; the delivering worker reads it here.
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    filter TEXT NOT NULL,
    destination TEXT NOT NULL,
    secret TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX subscriptions_tenant ON subscriptions (tenant, created_at);
