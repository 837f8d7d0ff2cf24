-- Operator tooling: dead-letter search, replays and purges, all audited.

-- The dead-letter view, newest first, with the cursor's tie-breaker: the
-- admin search walks it for `status IN ('failed','dead')` (the default of
-- the page, the CLI and every replay filter).
CREATE INDEX deliveries_dead_letters ON deliveries (created_at DESC, id DESC)
    WHERE status IN ('failed', 'dead');
-- Deliveries finished recently, per channel: the throughput column of
-- GET /v1/admin/queues counts the last minute with an index-only range scan.
CREATE INDEX deliveries_finished ON deliveries (finished_at, channel)
    WHERE finished_at IS NOT NULL;
-- (Purges select dead letters by when they died through the existing
-- `deliveries_failed (channel, finished_at)`.)

-- Text search in the last error (`q`): a trigram index when the server has
-- pg_trgm (it ships with Postgres; CREATE EXTENSION needs the database
-- owner), else the search is a scan bounded by the other filters and LIMIT.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_trgm not created (insufficient privilege); error search will scan';
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
        EXECUTE 'CREATE INDEX deliveries_last_error_trgm ON deliveries
                 USING gin (last_error gin_trgm_ops) WHERE last_error IS NOT NULL';
    END IF;
END
$$;

-- One operator replay: who asked, for what, how far it got. The set of
-- deliveries is fixed when the replay is created (`replay_items`), so a
-- replay that resumes after a crash works on exactly what was matched.
CREATE TABLE replays (
    id               TEXT PRIMARY KEY,                -- rpl_…
    api_key_id       TEXT,                            -- who (kept if the key is deleted)
    api_key_name     TEXT,
    filter           JSONB,                           -- the filter as given, or NULL for a list of ids
    delivery_ids     INT,                             -- how many ids were listed, for a list
    pace             INT CHECK (pace IS NULL OR pace > 0),   -- deliveries per second; NULL: full pace
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'cancelled', 'failed')),
    matched          BIGINT NOT NULL DEFAULT 0,
    replayed         BIGINT NOT NULL DEFAULT 0,
    skipped          BIGINT NOT NULL DEFAULT 0,
    failed           BIGINT NOT NULL DEFAULT 0,
    skip_reasons     JSONB NOT NULL DEFAULT '{}'::JSONB,  -- reason → count
    -- the worker process running it, and its last sign of life: a replay
    -- whose owner stops beating is taken over by another process
    owner            TEXT,
    heartbeat_at     TIMESTAMPTZ,
    error            TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    cancelled_by     TEXT
);
CREATE INDEX replays_active ON replays (created_at) WHERE status IN ('pending', 'running');
CREATE INDEX replays_created ON replays (created_at DESC);

-- The deliveries a replay matched, with the attempt count they had then:
-- a delivery replayed only if it is still failed/dead at that attempt, so
-- one that was replayed (by this or another replay) and failed again since
-- is not sent again by a stale batch. `outcome` is the checkpoint.
CREATE TABLE replay_items (
    replay_id    TEXT NOT NULL REFERENCES replays (id) ON DELETE CASCADE,
    delivery_id  TEXT NOT NULL,
    attempt      INT,                                  -- NULL: no such delivery when listed
    outcome      TEXT CHECK (outcome IN ('replayed', 'skipped', 'failed')),
    reason       TEXT,
    processed_at TIMESTAMPTZ,
    PRIMARY KEY (replay_id, delivery_id)
);
CREATE INDEX replay_items_pending ON replay_items (replay_id, delivery_id) WHERE outcome IS NULL;

-- One operator purge of old dead letters (the deliveries and their attempts
-- are deleted; this row remains).
CREATE TABLE purges (
    id            TEXT PRIMARY KEY,                   -- prg_…
    api_key_id    TEXT,
    api_key_name  TEXT,
    filter        JSONB NOT NULL,
    before        TIMESTAMPTZ NOT NULL,
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed')),
    deleted       BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ
);
