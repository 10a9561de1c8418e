-- Auto-sync: one schedule per receiver connection with auto_sync_enabled. A scheduler claims a
-- due row for a lease (SQLite serializes writers), runs it, and stores the next run.
CREATE TABLE dbsync_schedules (
    connection_id     BLOB PRIMARY KEY REFERENCES dbsync_connections (id) ON DELETE CASCADE,
    next_run_at       TEXT NOT NULL,
    claimed_by        TEXT,
    claimed_until     TEXT,
    last_started_at   TEXT,
    last_finished_at  TEXT,
    last_status       TEXT,
    last_error        TEXT,
    last_rows         INTEGER NOT NULL DEFAULT 0,
    last_tables       TEXT NOT NULL DEFAULT '[]',
    failures          INTEGER NOT NULL DEFAULT 0,
    runs              INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX dbsync_schedules_due_idx ON dbsync_schedules (next_run_at);

-- The UDP port `dbsync serve` serves QUIC on, so CLI commands beside it offer the right port.
ALTER TABLE dbsync_settings ADD COLUMN quic_port INTEGER;
