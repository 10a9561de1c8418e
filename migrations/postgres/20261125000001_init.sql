-- dbsync state store, PostgreSQL flavour. Keep in step with migrations/sqlite.

CREATE TABLE dbsync_connections (
    id                          UUID PRIMARY KEY,
    name                        TEXT NOT NULL UNIQUE,
    direction                   TEXT NOT NULL CHECK (direction IN ('sender', 'receiver')),
    site_url                    TEXT NOT NULL,
    status                      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'revoked', 'expired')),
    token_hash                  BYTEA UNIQUE,
    token_prefix                TEXT,
    token_ciphertext            BYTEA,
    approval_mode               TEXT NOT NULL DEFAULT 'auto_approve'
                                CHECK (approval_mode IN ('auto_approve', 'require_approval', 'per_table')),
    allowed_tables              JSONB NOT NULL DEFAULT '[]',
    excluded_tables             JSONB NOT NULL DEFAULT '[]',
    auto_approve_tables         JSONB NOT NULL DEFAULT '[]',
    max_downloads               BIGINT CHECK (max_downloads >= 0),
    downloads_used              BIGINT NOT NULL DEFAULT 0,
    max_records_total           BIGINT CHECK (max_records_total >= 0),
    records_downloaded          BIGINT NOT NULL DEFAULT 0,
    max_records_per_request     BIGINT NOT NULL DEFAULT 10000 CHECK (max_records_per_request > 0),
    rate_limit_per_minute       BIGINT NOT NULL DEFAULT 60 CHECK (rate_limit_per_minute > 0),
    download_password_hash      TEXT,
    ip_whitelist                JSONB NOT NULL DEFAULT '[]',
    allowed_hours_start         BIGINT CHECK (allowed_hours_start BETWEEN 0 AND 23),
    allowed_hours_end           BIGINT CHECK (allowed_hours_end BETWEEN 0 AND 23),
    time_zone                   TEXT NOT NULL DEFAULT 'UTC',
    expires_at                  TIMESTAMPTZ,
    default_conflict_strategy   TEXT NOT NULL DEFAULT 'overwrite'
                                CHECK (default_conflict_strategy IN ('skip', 'overwrite', 'merge', 'append', 'mirror')),
    auto_sync_enabled           BOOLEAN NOT NULL DEFAULT FALSE,
    auto_sync_tables            JSONB NOT NULL DEFAULT '[]',
    auto_sync_interval_minutes  BIGINT NOT NULL DEFAULT 60 CHECK (auto_sync_interval_minutes > 0),
    created_by                  TEXT NOT NULL,
    created_at                  TIMESTAMPTZ NOT NULL,
    updated_at                  TIMESTAMPTZ NOT NULL,
    approved_by                 TEXT,
    approved_at                 TIMESTAMPTZ,
    suspended_by                TEXT,
    suspended_at                TIMESTAMPTZ,
    suspended_reason            TEXT,
    revoked_by                  TEXT,
    revoked_at                  TIMESTAMPTZ,
    revoked_reason              TEXT,
    last_connected_at           TIMESTAMPTZ,
    last_transfer_at            TIMESTAMPTZ,
    total_transfers             BIGINT NOT NULL DEFAULT 0,
    total_records               BIGINT NOT NULL DEFAULT 0,
    total_bytes                 BIGINT NOT NULL DEFAULT 0,
    metadata                    JSONB NOT NULL DEFAULT '{}',
    UNIQUE (site_url, direction)
);

CREATE INDEX dbsync_connections_status_idx ON dbsync_connections (status);
CREATE INDEX dbsync_connections_expires_at_idx ON dbsync_connections (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE dbsync_transfers (
    id                      UUID PRIMARY KEY,
    connection_id           UUID REFERENCES dbsync_connections (id) ON DELETE SET NULL,
    direction               TEXT NOT NULL CHECK (direction IN ('send', 'receive')),
    table_name              TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'pending_approval', 'approved', 'denied',
                                'in_progress', 'completed', 'failed', 'cancelled', 'expired')),
    requires_approval       BOOLEAN NOT NULL DEFAULT FALSE,
    approved_by             TEXT,
    approved_at             TIMESTAMPTZ,
    denied_by               TEXT,
    denied_at               TIMESTAMPTZ,
    denial_reason           TEXT,
    approval_expires_at     TIMESTAMPTZ,
    records_requested       BIGINT NOT NULL DEFAULT 0,
    records_transferred     BIGINT NOT NULL DEFAULT 0,
    records_created         BIGINT NOT NULL DEFAULT 0,
    records_updated         BIGINT NOT NULL DEFAULT 0,
    records_skipped         BIGINT NOT NULL DEFAULT 0,
    records_failed          BIGINT NOT NULL DEFAULT 0,
    bytes_wire              BIGINT NOT NULL DEFAULT 0,
    bytes_raw               BIGINT NOT NULL DEFAULT 0,
    conflict_strategy       TEXT NOT NULL DEFAULT 'overwrite',
    transport               TEXT CHECK (transport IN ('ws', 'quic')),
    requester_ip            TEXT,
    requester_user_agent    TEXT,
    error_message           TEXT,
    resume_key              JSONB,
    created_at              TIMESTAMPTZ NOT NULL,
    started_at              TIMESTAMPTZ,
    completed_at            TIMESTAMPTZ,
    metadata                JSONB NOT NULL DEFAULT '{}'
);

CREATE INDEX dbsync_transfers_connection_idx ON dbsync_transfers (connection_id, created_at);
CREATE INDEX dbsync_transfers_status_idx ON dbsync_transfers (status);
CREATE INDEX dbsync_transfers_created_at_idx ON dbsync_transfers (created_at);

CREATE TABLE dbsync_settings (
    id                      BIGINT PRIMARY KEY CHECK (id = 1),
    incoming_mode           TEXT NOT NULL DEFAULT 'require_approval'
                            CHECK (incoming_mode IN ('auto_accept', 'require_approval', 'require_password', 'deny_all')),
    incoming_password_hash  TEXT,
    site_id                 UUID NOT NULL,
    site_name               TEXT,
    site_url                TEXT,
    updated_by              TEXT,
    updated_at              TIMESTAMPTZ NOT NULL
);

CREATE TABLE dbsync_audit_events (
    id              UUID PRIMARY KEY,
    occurred_at     TIMESTAMPTZ NOT NULL,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    connection_id   UUID,
    transfer_id     UUID,
    detail          JSONB NOT NULL DEFAULT '{}'
);

CREATE INDEX dbsync_audit_events_connection_idx ON dbsync_audit_events (connection_id, occurred_at);
CREATE INDEX dbsync_audit_events_transfer_idx ON dbsync_audit_events (transfer_id);

CREATE TABLE dbsync_checkpoints (
    connection_id       UUID NOT NULL REFERENCES dbsync_connections (id) ON DELETE CASCADE,
    table_name          TEXT NOT NULL,
    transfer_id         UUID,
    last_key            JSONB,
    incremental_cursor  JSONB,
    rows_applied        BIGINT NOT NULL DEFAULT 0,
    updated_at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (connection_id, table_name)
);
