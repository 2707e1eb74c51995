-- Blobs (WebAssembly modules and the like) kept in the database itself, so
-- that every node of a deployment reads what any node stored. Content is
-- split into chunks: no single value gets near PostgreSQL's 1 GB limit, and
-- a reader can take one chunk at a time.
CREATE TABLE blobs (
    key TEXT PRIMARY KEY,
    size BIGINT NOT NULL CHECK (size >= 0),
    chunks INTEGER NOT NULL CHECK (chunks >= 0),
    created_at BIGINT NOT NULL
);

CREATE TABLE blob_chunks (
    key TEXT NOT NULL REFERENCES blobs (key) ON DELETE CASCADE,
    n INTEGER NOT NULL CHECK (n >= 0),
    data BYTEA NOT NULL,
    PRIMARY KEY (key, n)
);
