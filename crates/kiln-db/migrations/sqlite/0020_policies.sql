-- Admission policies (`kiln_flow::policy`): a tenant's rules over every
-- job it submits, stored as written and parsed again when read.
CREATE TABLE policies (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    rule TEXT NOT NULL,
    message TEXT NOT NULL,
    -- A JSON list of kinds; empty: every kind.
    applies_to TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- Bumped in the transaction of every change to a tenant's policies: the
-- per-process caches compare it to know whether theirs is still current.
-- Its row is also the lock that keeps a tenant under its policy cap.
CREATE TABLE policy_versions (
    tenant TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
