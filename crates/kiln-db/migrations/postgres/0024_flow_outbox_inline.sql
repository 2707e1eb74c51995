-- Workers that run pipeline steps advance a step's run in the transaction
-- that records the step's end and delete its outbox row there. The wake-up
-- for advancers elsewhere is therefore sent at commit, and only for rows
-- still in the outbox then; the job trigger no longer sends it.
CREATE OR REPLACE FUNCTION kiln_flow_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flow_outbox (run_id, job_id)
        SELECT n.run_id, n.id FROM new_rows n
        WHERE n.run_id IS NOT NULL AND n.status IN ('succeeded', 'failed', 'cancelled', 'dead')
        AND EXISTS (SELECT 1 FROM old_rows o WHERE o.id = n.id
            AND o.status NOT IN ('succeeded', 'failed', 'cancelled', 'dead'))
        ORDER BY n.id;
    RETURN NULL;
END $$;

CREATE FUNCTION kiln_flow_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Notifications within a transaction are folded into one.
    IF EXISTS (SELECT 1 FROM flow_outbox WHERE id = NEW.id) THEN
        PERFORM pg_notify('kiln_flow', '');
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER flow_outbox_notify AFTER INSERT ON flow_outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION kiln_flow_outbox_notify();

CREATE INDEX flow_outbox_job ON flow_outbox (job_id);
