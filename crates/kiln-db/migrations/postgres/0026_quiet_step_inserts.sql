-- A completion that advances a pipeline run inserts the next step's job and
-- leases it to its own worker in one transaction; telling every listener
-- of a job no one else can take would only make each of them look for
-- one. Such inserts set `kiln.quiet_insert` for their transaction, and
-- the transaction notifies by itself when it leaves a job unleased.
CREATE OR REPLACE FUNCTION kiln_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('kiln.quiet_insert', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('kiln_jobs', '');
    END IF;
    RETURN NULL;
END $$;
