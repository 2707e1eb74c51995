-- On PostgreSQL a chained step's completion reads its run through a function
-- in the statement that locks it (see the PostgreSQL migration of the same
-- number); SQLite's completion already reads it in the same trip. The number
-- is kept in step.
SELECT 1;
