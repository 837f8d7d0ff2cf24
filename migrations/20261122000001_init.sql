-- Herald's schema. Postgres is the source of truth; Redis only carries ids.
-- Status columns are TEXT with CHECK constraints mirroring herald-core, so a
-- bug elsewhere cannot write a state the state machine does not know.

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,                  -- key_…
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL UNIQUE,              -- public part of the key, shown in listings
    secret_hash  BYTEA NOT NULL,                    -- SHA-256 of the secret part; the secret itself is never stored
    scopes       TEXT[] NOT NULL CHECK (scopes <@ ARRAY['send','read','admin']::TEXT[]),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,                    -- the product's own user id
    email      TEXT,
    locale     TEXT,
    timezone   TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY,               -- dev_…
    user_id         TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform        TEXT NOT NULL CHECK (platform IN ('ios', 'android', 'web')),
    provider        TEXT NOT NULL CHECK (provider IN ('fcm', 'apns', 'webpush')),
    token           TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- set when a provider says the token is gone; cleared by re-registering
    disabled_at     TIMESTAMPTZ,
    disabled_reason TEXT,
    UNIQUE (provider, token)
);
CREATE INDEX devices_user ON devices (user_id) WHERE disabled_at IS NULL;

CREATE TABLE notifications (
    id              TEXT PRIMARY KEY,               -- ntf_…
    api_key_id      TEXT REFERENCES api_keys (id) ON DELETE SET NULL,
    user_id         TEXT NOT NULL,
    category        TEXT NOT NULL,
    priority        TEXT NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
    title           TEXT NOT NULL,
    body            TEXT NOT NULL,
    data            JSONB NOT NULL DEFAULT '{}'::JSONB,
    request_id      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX notifications_user ON notifications (user_id, created_at DESC);

CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,              -- dlv_…
    notification_id  TEXT NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    user_id          TEXT NOT NULL,
    channel          TEXT NOT NULL CHECK (channel IN ('email', 'push', 'in_app')),
    priority         TEXT NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'retrying', 'sent', 'delivered',
                                                     'failed', 'dead', 'cancelled', 'skipped')),
    -- attempts started so far; claims and results are fenced on it
    attempt          INT NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     INT NOT NULL CHECK (max_attempts > 0),
    next_attempt_at  TIMESTAMPTZ,                   -- when a retrying delivery is due
    lease_until      TIMESTAMPTZ,                   -- while sending: when the claim lapses
    enqueued_at      TIMESTAMPTZ,                   -- last time a job was pushed to Redis
    skip_reason      TEXT,
    last_error       TEXT,
    last_error_class TEXT CHECK (last_error_class IN ('permanent', 'transient', 'rate_limited', 'ambiguous')),
    last_provider_status INT,
    ambiguous_attempts INT NOT NULL DEFAULT 0,      -- attempts whose outcome could not be recorded: possible duplicates
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at          TIMESTAMPTZ,
    delivered_at     TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,                   -- when it reached a final state
    UNIQUE (notification_id, channel)
);
-- The sweeper's view: deliveries still owed work.
CREATE INDEX deliveries_pending ON deliveries (status, updated_at)
    WHERE status IN ('queued', 'sending', 'retrying');
-- The dead-letter view and operator search.
CREATE INDEX deliveries_failed ON deliveries (channel, finished_at DESC)
    WHERE status IN ('failed', 'dead');
CREATE INDEX deliveries_user ON deliveries (user_id, created_at DESC);

CREATE TABLE delivery_attempts (
    delivery_id     TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt         INT NOT NULL,
    worker_id       TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ,
    -- sent | delivered | skipped | permanent | transient | rate_limited | ambiguous | lease_expired
    outcome         TEXT,
    provider_status INT,
    error           TEXT,                           -- truncated, never secrets
    detail          JSONB,                          -- e.g. per-device results of a push
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE inbox_items (
    notification_id TEXT PRIMARY KEY REFERENCES notifications (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    category        TEXT NOT NULL,
    title           TEXT NOT NULL,
    body            TEXT NOT NULL,
    data            JSONB NOT NULL DEFAULT '{}'::JSONB,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    read_at         TIMESTAMPTZ,
    archived_at     TIMESTAMPTZ
);
CREATE INDEX inbox_user ON inbox_items (user_id, created_at DESC);

-- Idempotency-Key records, per API key; kept at least 24 h.
CREATE TABLE idempotency_keys (
    api_key_id      TEXT NOT NULL,
    key             TEXT NOT NULL,
    request_hash    BYTEA NOT NULL,
    status_code     INT NOT NULL,
    response        JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
