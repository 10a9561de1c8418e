-- dbsync state store, SQLite flavour. Keep in step with migrations/postgres.
-- uuid -> BLOB (16 bytes), timestamps -> RFC 3339 TEXT in UTC, JSON -> TEXT

CREATE TABLE dbsync_connections (
    id                          BLOB PRIMARY KEY,
    name                        TEXT NOT NULL UNIQUE,
    direction                   TEXT NOT NULL CHECK (direction IN ('sender', 'receiver')),
    site_url                    TEXT NOT NULL,
    status                      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'revoked', 'expired')),
    token_hash                  BLOB UNIQUE,
    token_prefix                TEXT,
    token_ciphertext            BLOB,
    approval_mode               TEXT NOT NULL DEFAULT 'auto_approve'
                                CHECK (approval_mode IN ('auto_approve', 'require_approval', 'per_table')),
    allowed_tables              TEXT NOT NULL DEFAULT '[]',
    excluded_tables             TEXT NOT NULL DEFAULT '[]',
    auto_approve_tables         TEXT NOT NULL DEFAULT '[]',
    max_downloads               INTEGER CHECK (max_downloads >= 0),
    downloads_used              INTEGER NOT NULL DEFAULT 0,
    max_records_total           INTEGER CHECK (max_records_total >= 0),
    records_downloaded          INTEGER NOT NULL DEFAULT 0,
    max_records_per_request     INTEGER NOT NULL DEFAULT 10000 CHECK (max_records_per_request > 0),
    rate_limit_per_minute       INTEGER NOT NULL DEFAULT 60 CHECK (rate_limit_per_minute > 0),
    download_password_hash      TEXT,
    ip_whitelist                TEXT NOT NULL DEFAULT '[]',
    allowed_hours_start         INTEGER CHECK (allowed_hours_start BETWEEN 0 AND 23),
    allowed_hours_end           INTEGER CHECK (allowed_hours_end BETWEEN 0 AND 23),
    time_zone                   TEXT NOT NULL DEFAULT 'UTC',
    expires_at                  TEXT,
    default_conflict_strategy   TEXT NOT NULL DEFAULT 'overwrite'
                                CHECK (default_conflict_strategy IN ('skip', 'overwrite', 'merge', 'append', 'mirror')),
    auto_sync_enabled           BOOLEAN NOT NULL DEFAULT FALSE,
    auto_sync_tables            TEXT NOT NULL DEFAULT '[]',
    auto_sync_interval_minutes  INTEGER NOT NULL DEFAULT 60 CHECK (auto_sync_interval_minutes > 0),
    created_by                  TEXT NOT NULL,
    created_at                  TEXT NOT NULL,
    updated_at                  TEXT NOT NULL,
    approved_by                 TEXT,
    approved_at                 TEXT,
    suspended_by                TEXT,
    suspended_at                TEXT,
    suspended_reason            TEXT,
    revoked_by                  TEXT,
    revoked_at                  TEXT,
    revoked_reason              TEXT,
    last_connected_at           TEXT,
    last_transfer_at            TEXT,
    total_transfers             INTEGER NOT NULL DEFAULT 0,
    total_records               INTEGER NOT NULL DEFAULT 0,
    total_bytes                 INTEGER NOT NULL DEFAULT 0,
    metadata                    TEXT NOT NULL DEFAULT '{}',
    UNIQUE (site_url, direction)
);

CREATE INDEX dbsync_connections_status_idx ON dbsync_connections (status);
CREATE INDEX dbsync_connections_expires_at_idx ON dbsync_connections (expires_at);

CREATE TABLE dbsync_transfers (
    id                      BLOB PRIMARY KEY,
    connection_id           BLOB REFERENCES dbsync_connections (id) ON DELETE SET NULL,
    direction               TEXT NOT NULL CHECK (direction IN ('send', 'receive')),
    table_name              TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'pending_approval', 'approved', 'denied',
                                'in_progress', 'completed', 'failed', 'cancelled', 'expired')),
    requires_approval       BOOLEAN NOT NULL DEFAULT FALSE,
    approved_by             TEXT,
    approved_at             TEXT,
    denied_by               TEXT,
    denied_at               TEXT,
    denial_reason           TEXT,
    approval_expires_at     TEXT,
    records_requested       INTEGER NOT NULL DEFAULT 0,
    records_transferred     INTEGER NOT NULL DEFAULT 0,
    records_created         INTEGER NOT NULL DEFAULT 0,
    records_updated         INTEGER NOT NULL DEFAULT 0,
    records_skipped         INTEGER NOT NULL DEFAULT 0,
    records_failed          INTEGER NOT NULL DEFAULT 0,
    bytes_wire              INTEGER NOT NULL DEFAULT 0,
    bytes_raw               INTEGER NOT NULL DEFAULT 0,
    conflict_strategy       TEXT NOT NULL DEFAULT 'overwrite',
    transport               TEXT CHECK (transport IN ('ws', 'quic')),
    requester_ip            TEXT,
    requester_user_agent    TEXT,
    error_message           TEXT,
    resume_key              TEXT,
    created_at              TEXT NOT NULL,
    started_at              TEXT,
    completed_at            TEXT,
    metadata                TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX dbsync_transfers_connection_idx ON dbsync_transfers (connection_id, created_at);
CREATE INDEX dbsync_transfers_status_idx ON dbsync_transfers (status);
CREATE INDEX dbsync_transfers_created_at_idx ON dbsync_transfers (created_at);

CREATE TABLE dbsync_settings (
    id                      INTEGER PRIMARY KEY CHECK (id = 1),
    incoming_mode           TEXT NOT NULL DEFAULT 'require_approval'
                            CHECK (incoming_mode IN ('auto_accept', 'require_approval', 'require_password', 'deny_all')),
    incoming_password_hash  TEXT,
    site_id                 BLOB NOT NULL,
    site_name               TEXT,
    site_url                TEXT,
    updated_by              TEXT,
    updated_at              TEXT NOT NULL
);

CREATE TABLE dbsync_audit_events (
    id              BLOB PRIMARY KEY,
    occurred_at     TEXT NOT NULL,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    connection_id   BLOB,
    transfer_id     BLOB,
    detail          TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX dbsync_audit_events_connection_idx ON dbsync_audit_events (connection_id, occurred_at);
CREATE INDEX dbsync_audit_events_transfer_idx ON dbsync_audit_events (transfer_id);

CREATE TABLE dbsync_checkpoints (
    connection_id       BLOB NOT NULL REFERENCES dbsync_connections (id) ON DELETE CASCADE,
    table_name          TEXT NOT NULL,
    transfer_id         BLOB,
    last_key            TEXT,
    incremental_cursor  TEXT,
    rows_applied        INTEGER NOT NULL DEFAULT 0,
    updated_at          TEXT NOT NULL,
    PRIMARY KEY (connection_id, table_name)
);
