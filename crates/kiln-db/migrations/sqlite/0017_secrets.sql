-- Secrets, one row per version, sealed (kiln_core::secrets): the value under
-- a data key of its own, the data key under the deployment's master key
-- (`master_id` names which). Hex text, so both databases store the same.
-- Nothing here is readable without the master key, which is never stored.
CREATE TABLE secrets (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    ciphertext TEXT NOT NULL,
    nonce TEXT NOT NULL,
    wrapped_key TEXT NOT NULL,
    wrap_nonce TEXT NOT NULL,
    master_id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    PRIMARY KEY (tenant, name, version)
);
