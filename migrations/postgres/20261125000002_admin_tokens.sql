-- Bearer tokens for the admin JSON API. Only the SHA-256 of a token is stored.
CREATE TABLE dbsync_admin_tokens (
    id              UUID PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    token_hash      BYTEA NOT NULL UNIQUE,
    token_prefix    TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    last_used_at    TIMESTAMPTZ,
    revoked_by      TEXT,
    revoked_at      TIMESTAMPTZ
);
