-- PostgreSQL's read of a run in the statement that locks it (see the
-- PostgreSQL migration of the same number); SQLite's writer holds the
-- whole database, so its read needs nothing new. The number is kept in
-- step.
SELECT 1;
