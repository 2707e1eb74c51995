-- PostgreSQL's rollup triggers now take their rows in one order (see the
-- PostgreSQL migration of the same number). SQLite has one writer at a
-- time, so its triggers cannot deadlock; the number is kept in step.
SELECT 1;
