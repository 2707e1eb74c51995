-- Detector settings per tenant, self-healing rules, and what the rules did
-- (`kiln_ops::incidents`, `kiln_ops::rules`).

-- A tenant's overrides of the deployment's detector defaults, as JSON
-- (only the fields it set).
CREATE TABLE detector_settings (
    tenant TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- A rule as applied (its checked JSON body); every apply replaces it.
CREATE TABLE rules (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX rules_active ON rules (tenant) WHERE active;

-- The row a firing locks: every decision on a rule's cooldown and hourly
-- cap is taken holding it, so two engines cannot both take the last fire.
CREATE TABLE rule_state (
    tenant TEXT NOT NULL,
    rule TEXT NOT NULL,
    last_fired_at INTEGER,
    fires INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, rule)
);

-- Each time a rule fired: at most once per triggering event.
CREATE TABLE rule_fires (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    rule TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    time INTEGER NOT NULL
);
CREATE UNIQUE INDEX rule_fires_event ON rule_fires (tenant, rule, event_id);
CREATE INDEX rule_fires_time ON rule_fires (tenant, rule, time);
CREATE INDEX rule_fires_age ON rule_fires (time);

-- Every action a firing took, with its outcome.
CREATE TABLE rule_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fire_id INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    rule TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'error')),
    message TEXT,
    time INTEGER NOT NULL
);
CREATE INDEX rule_actions_rule ON rule_actions (tenant, rule, id);
CREATE INDEX rule_actions_age ON rule_actions (time);
