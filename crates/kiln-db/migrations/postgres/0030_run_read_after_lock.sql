-- The read of a run that a step's end has just locked, made in the
-- statement that writes the end and takes the lock (`PgFlowTx::complete_one`),
-- one trip fewer on every chained step. A statement's snapshot is taken
-- when it starts, before the lock: a run whose last holder committed
-- meanwhile would be read as it was before that holder's writes. A
-- VOLATILE function's query takes a snapshot of its own when it runs,
-- after the lock, and sees what the calling statement wrote before it
-- (the job's end).
-- The columns are those `run_ends_locked` reads: the run, its instances on
-- these jobs with each job's end, and the rows of these steps.
CREATE FUNCTION kiln_run_locked_read(p_run BIGINT, p_jobs BIGINT[], p_steps TEXT[])
RETURNS TABLE (run runs, ended TEXT, step_rows TEXT) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    SELECT r,
        COALESCE((SELECT json_agg(json_build_array(i.step, i.idx, i.attempt, i.job_id, i.status,
                i.item, i.exit_code, i.stdout, i.error, i.started_at, i.finished_at, j.status,
                j.result, j.error, j.finished_at))
            FROM unnest(p_jobs) AS want(job)
            CROSS JOIN LATERAL (SELECT * FROM run_instances ri WHERE ri.job_id = want.job OFFSET 0) i
            JOIN jobs j ON j.id = i.job_id
            WHERE i.run_id = r.id AND j.run_id = r.id), '[]')::text,
        COALESCE((SELECT json_agg(json_build_array(s.step, s.status, s.total, s.succeeded,
                s.failed, s.started_at, s.finished_at, s.deadline_at, s.detail))
            FROM unnest(p_steps) AS want(name)
            CROSS JOIN LATERAL (SELECT * FROM run_steps rs
                WHERE rs.run_id = p_run AND rs.step = want.name OFFSET 0) s), '[]')::text
    FROM runs r WHERE r.id = p_run;
END $$;
