-- PostgreSQL's counter triggers now take their shard's advisory lock (see
-- the PostgreSQL migration of the same number). SQLite has one writer at a
-- time; the number is kept in step.
SELECT 1;
