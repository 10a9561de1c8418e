-- What used to live in each process, kept in the state database (as on PostgreSQL, where several
-- agents share it; one SQLite agent keeps its admin sessions across restarts).

-- Per-connection request limits (unused on SQLite: one agent keeps them in memory).
CREATE TABLE dbsync_rate_limits (
    key         BLOB PRIMARY KEY,
    tat_micros  INTEGER NOT NULL
);

-- Admin page sign-in sessions: the SHA-256 of the cookie, never the cookie.
CREATE TABLE dbsync_web_sessions (
    key_hash      BLOB PRIMARY KEY,
    token_id      BLOB NOT NULL,
    token_name    TEXT NOT NULL,
    csrf          TEXT NOT NULL,
    flash         TEXT,
    created_at    TEXT NOT NULL,
    last_seen_at  TEXT NOT NULL
);
CREATE INDEX dbsync_web_sessions_seen_idx ON dbsync_web_sessions (last_seen_at);

-- The site's QUIC certificate (unused on SQLite: the files beside the key file).
CREATE TABLE dbsync_site_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    cert_der    BLOB NOT NULL,
    key_sealed  BLOB NOT NULL,
    created_at  TEXT NOT NULL
);

ALTER TABLE dbsync_connections ADD COLUMN push_claimed_until TEXT;
