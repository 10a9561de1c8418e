-- Auto-sync: one schedule per receiver connection with auto_sync_enabled. A scheduler claims a
-- due row (FOR UPDATE SKIP LOCKED on PostgreSQL) for a lease, runs it, and stores the next run.
CREATE TABLE dbsync_schedules (
    connection_id     UUID PRIMARY KEY REFERENCES dbsync_connections (id) ON DELETE CASCADE,
    next_run_at       TIMESTAMPTZ NOT NULL,
    claimed_by        TEXT,
    claimed_until     TIMESTAMPTZ,
    last_started_at   TIMESTAMPTZ,
    last_finished_at  TIMESTAMPTZ,
    last_status       TEXT,
    last_error        TEXT,
    last_rows         BIGINT NOT NULL DEFAULT 0,
    last_tables       JSONB NOT NULL DEFAULT '[]',
    failures          BIGINT NOT NULL DEFAULT 0,
    runs              BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX dbsync_schedules_due_idx ON dbsync_schedules (next_run_at);

-- The UDP port `dbsync serve` serves QUIC on, so CLI commands beside it offer the right port.
ALTER TABLE dbsync_settings ADD COLUMN quic_port INTEGER;
