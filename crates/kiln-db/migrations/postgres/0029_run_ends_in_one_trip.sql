-- A chained step's completion reads its run in the statement that records
-- the end and locks the run, instead of in a statement of its own. The
-- read must not come from that statement's snapshot: taken when the
-- statement started, it misses what the run's last holder committed while
-- the statement waited for its job's row, and the advance would write over
-- it. A VOLATILE function's queries each take a snapshot of their own (READ
-- COMMITTED), so this one, called once the run is locked, reads the run as
-- its last holder left it. The rows asked for are found by one index probe
-- per job and per step name, whatever plan is cached.
CREATE FUNCTION kiln_run_ends(p_run BIGINT, p_jobs BIGINT[], p_names TEXT[])
RETURNS TABLE (id BIGINT, tenant TEXT, pipeline TEXT, version INTEGER, status TEXT, mode TEXT,
    params TEXT, labels TEXT, idempotency_key TEXT, trigger TEXT, attempt INTEGER, reason TEXT,
    detail TEXT, created_at BIGINT, started_at BIGINT, finished_at BIGINT, ended TEXT, steps TEXT)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT r.id, r.tenant, r.pipeline, r.version, r.status, r.mode, r.params, r.labels,
        r.idempotency_key, r.trigger, r.attempt, r.reason, r.detail, r.created_at, r.started_at,
        r.finished_at,
        COALESCE((SELECT json_agg(json_build_array(i.step, i.idx, i.attempt, i.job_id, i.status,
                i.item, i.exit_code, i.stdout, i.error, i.started_at, i.finished_at, j.status,
                j.result, j.error, j.finished_at))
            FROM unnest(p_jobs) AS want(job)
            CROSS JOIN LATERAL (SELECT * FROM run_instances ri WHERE ri.job_id = want.job OFFSET 0) i
            JOIN jobs j ON j.id = i.job_id
            WHERE i.run_id = r.id AND j.run_id = r.id), '[]')::text,
        COALESCE((SELECT json_agg(json_build_array(s.step, s.status, s.total, s.succeeded, s.failed,
                s.started_at, s.finished_at, s.deadline_at, s.detail))
            FROM unnest(p_names) AS want(name)
            CROSS JOIN LATERAL (SELECT * FROM run_steps rs
                WHERE rs.run_id = p_run AND rs.step = want.name OFFSET 0) s), '[]')::text
    FROM runs r WHERE r.id = p_run;
END $$;
