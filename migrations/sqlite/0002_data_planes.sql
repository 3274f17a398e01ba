-- Data planes as the control plane last saw them (Kong's
-- clustering_data_planes), written in batches, never once per heartbeat.
CREATE TABLE IF NOT EXISTS data_planes (
    id        TEXT    PRIMARY KEY,
    body      TEXT    NOT NULL,
    last_seen INTEGER NOT NULL
);
