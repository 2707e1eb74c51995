-- PostgreSQL's job insert NOTIFY can be silenced for a transaction (see the
-- PostgreSQL migration of the same number); SQLite has no NOTIFY. The number
-- is kept in step.
SELECT 1;
