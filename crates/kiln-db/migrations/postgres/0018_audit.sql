-- The audit trail (kiln_core::audit). A record is inserted without a place
-- in its tenant's chain; the chainer (one at a time per database, under an
-- advisory lock) gives it `seq`, `prev_hash` and `hash` and moves the
-- tenant's head. Rows are never updated after that.
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    time BIGINT NOT NULL,
    actor_kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    outcome TEXT NOT NULL,
    rationale TEXT,
    seq BIGINT,
    prev_hash TEXT,
    hash TEXT
);
CREATE UNIQUE INDEX audit_chain ON audit (tenant, seq);
CREATE INDEX audit_unchained ON audit (id) WHERE seq IS NULL;
CREATE INDEX audit_tenant_id ON audit (tenant, id);

-- Each tenant's last chained record: cutting the chain's tail shows as a
-- head past its end.
CREATE TABLE audit_heads (
    tenant TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
