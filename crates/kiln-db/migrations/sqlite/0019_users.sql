-- Users of a tenant, with a role and an argon2id password hash (a PHC
-- string: algorithm, parameters, salt and hash; never the password).
CREATE TABLE users (
    tenant TEXT NOT NULL,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, username)
);

-- One row per login: a token names its session, and a session revoked
-- (logout, or its user deleted or changed) refuses the token at once.
CREATE TABLE user_sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    username TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    source TEXT NOT NULL
);
CREATE INDEX user_sessions_user ON user_sessions (tenant, username);
CREATE INDEX user_sessions_expires ON user_sessions (expires_at);

-- Failed logins per account (`account:<tenant>/<user>`) and per source
-- address (`source:<ip>`), shared by every API process.
CREATE TABLE login_failures (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    locked_until INTEGER
);

-- API keys may expire; when each was last used (at most about once a
-- minute per key and process).
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
