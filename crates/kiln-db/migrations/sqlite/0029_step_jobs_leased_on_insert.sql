-- On PostgreSQL a chained step's next job can be inserted already leased
-- (see the PostgreSQL migration of the same number). SQLite inserts it and
-- leases it in the statement that writes the run's rows, as before. The
-- number is kept in step.
SELECT 1;
