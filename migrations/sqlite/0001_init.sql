-- Entities are stored as validated JSON documents: the schema language in
-- `model` owns field types and checks, so one table serves every entity and
-- a new entity needs no migration.
CREATE TABLE IF NOT EXISTS entities (
    entity TEXT NOT NULL,
    id     TEXT NOT NULL,
    body   TEXT NOT NULL,
    PRIMARY KEY (entity, id)
);

-- One row per entity change, ordered by config version; data planes sync
-- from it.
CREATE TABLE IF NOT EXISTS change_log (
    version    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    entity     TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    op         TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    body       TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (version, seq)
);

CREATE TABLE IF NOT EXISTS config_version (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    version   INTEGER NOT NULL
);
INSERT OR IGNORE INTO config_version (singleton, version) VALUES (1, 0);
