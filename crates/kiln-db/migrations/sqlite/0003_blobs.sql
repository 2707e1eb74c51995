-- Blobs kept in the database itself (see the PostgreSQL migration): chunked,
-- so a reader can take one chunk at a time.
CREATE TABLE blobs (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    chunks INTEGER NOT NULL CHECK (chunks >= 0),
    created_at INTEGER NOT NULL
);

CREATE TABLE blob_chunks (
    key TEXT NOT NULL REFERENCES blobs (key) ON DELETE CASCADE,
    n INTEGER NOT NULL CHECK (n >= 0),
    data BLOB NOT NULL,
    PRIMARY KEY (key, n)
);
