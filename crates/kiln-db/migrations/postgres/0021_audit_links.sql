-- The chain moves out of `audit` into `audit_links`, so that audit rows are
-- only ever inserted: chaining used to update every row (a second heap
-- tuple and new entries in each of its indexes, since `seq` is indexed).
-- A record is chained once it has a link; `audit_chainer` is the chainer's
-- watermark (see kiln_db::audit).
CREATE TABLE audit_links (
    id BIGINT PRIMARY KEY,
    tenant TEXT NOT NULL,
    seq BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_links (id, tenant, seq, prev_hash, hash)
    SELECT id, tenant, seq, prev_hash, hash FROM audit WHERE seq IS NOT NULL;
CREATE UNIQUE INDEX audit_links_chain ON audit_links (tenant, seq);

CREATE TABLE audit_chainer (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    low BIGINT NOT NULL,
    seen BIGINT NOT NULL,
    pending BIGINT NOT NULL,
    pending_at BIGINT NOT NULL
);
INSERT INTO audit_chainer (one, low, seen, pending, pending_at)
    SELECT TRUE, w.low, w.low, w.low, 0 FROM (SELECT COALESCE(
        (SELECT MIN(id) - 1 FROM audit WHERE seq IS NULL),
        (SELECT MAX(id) FROM audit), 0) AS low) w;

DROP INDEX audit_chain;
DROP INDEX audit_unchained;
ALTER TABLE audit DROP COLUMN seq, DROP COLUMN prev_hash, DROP COLUMN hash;
