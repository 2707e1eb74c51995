-- On PostgreSQL a completion that advances its run inline keeps its step's
-- end out of the outbox (see the PostgreSQL migration of the same number);
-- SQLite's completion deletes the row in the same trip. The number is kept
-- in step.
SELECT 1;
