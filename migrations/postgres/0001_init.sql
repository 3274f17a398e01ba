-- Entities are stored as validated JSON documents: the schema language in
-- `model` owns field types and checks, so one table serves every entity and
-- a new entity needs no migration.
CREATE TABLE IF NOT EXISTS entities (
    entity TEXT  NOT NULL,
    id     UUID  NOT NULL,
    body   JSONB NOT NULL,
    PRIMARY KEY (entity, id)
);

-- One row per entity change, ordered by config version; data planes sync
-- from it.
CREATE TABLE IF NOT EXISTS change_log (
    version    BIGINT NOT NULL,
    seq        INTEGER NOT NULL,
    entity     TEXT   NOT NULL,
    id         UUID   NOT NULL,
    op         TEXT   NOT NULL CHECK (op IN ('upsert', 'delete')),
    body       JSONB,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (version, seq)
);

CREATE TABLE IF NOT EXISTS config_version (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    version   BIGINT  NOT NULL
);
INSERT INTO config_version (singleton, version) VALUES (1, 0) ON CONFLICT DO NOTHING;
