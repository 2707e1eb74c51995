-- A completion that locks its step's run in the statement that records the
-- step's end advances the run in that transaction: an outbox row would be
-- written only to be deleted again. Such a statement names those jobs in
-- `kiln.outbox_taken` (comma-separated ids, for the rest of its
-- transaction), and they get no outbox row.
CREATE OR REPLACE FUNCTION kiln_flow_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    taken int8[] := string_to_array(NULLIF(current_setting('kiln.outbox_taken', true), ''), ',')::int8[];
BEGIN
    INSERT INTO flow_outbox (run_id, job_id)
        SELECT n.run_id, n.id FROM new_rows n
        WHERE n.run_id IS NOT NULL AND n.status IN ('succeeded', 'failed', 'cancelled', 'dead')
        AND EXISTS (SELECT 1 FROM old_rows o WHERE o.id = n.id
            AND o.status NOT IN ('succeeded', 'failed', 'cancelled', 'dead'))
        AND NOT COALESCE(n.id = ANY(taken), false)
        ORDER BY n.id;
    RETURN NULL;
END $$;
