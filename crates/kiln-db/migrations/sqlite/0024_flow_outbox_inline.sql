-- Workers that run pipeline steps find a step end's outbox row by its job,
-- in the transaction that records the end.
CREATE INDEX flow_outbox_job ON flow_outbox (job_id);
