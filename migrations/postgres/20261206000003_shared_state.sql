-- Several agents on one state database share what used to live in each process.

-- Per-connection request limits: GCRA's theoretical arrival time per key (a connection's
-- requests, or its download-password guesses), microseconds since the Unix epoch. One atomic
-- statement per request, whichever agent takes it.
CREATE TABLE dbsync_rate_limits (
    key         UUID PRIMARY KEY,
    tat_micros  BIGINT NOT NULL
);

-- Admin page sign-in sessions: the SHA-256 of the cookie, never the cookie.
CREATE TABLE dbsync_web_sessions (
    key_hash      BYTEA PRIMARY KEY,
    token_id      UUID NOT NULL,
    token_name    TEXT NOT NULL,
    csrf          TEXT NOT NULL,
    flash         JSONB,
    created_at    TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX dbsync_web_sessions_seen_idx ON dbsync_web_sessions (last_seen_at);

-- The site's QUIC certificate, made once and presented by every agent; its private key sealed
-- by the vault (every agent of a site holds the same encryption key).
CREATE TABLE dbsync_site_identity (
    id          SMALLINT PRIMARY KEY CHECK (id = 1),
    cert_der    BYTEA NOT NULL,
    key_sealed  BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

-- A status or token push to a peer is claimed by one agent at a time.
ALTER TABLE dbsync_connections ADD COLUMN push_claimed_until TIMESTAMPTZ;
