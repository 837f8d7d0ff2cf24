-- Client routes: the signed-in user's inbox, searchable, and cheap to poll.

-- Read state changes bump updated_at, so "what changed for this user" is a
-- max() over an index.
ALTER TABLE inbox_items ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX inbox_user_updated ON inbox_items (user_id, updated_at);

-- Full-text search over title and body ('simple': no language stemming, so
-- it works the same for every locale).
ALTER TABLE inbox_items ADD COLUMN search TSVECTOR
    GENERATED ALWAYS AS (to_tsvector('simple', title || ' ' || body)) STORED;
CREATE INDEX inbox_search ON inbox_items USING GIN (search);

-- Delivery status changes of a user's notifications, for the same max().
CREATE INDEX deliveries_user_updated ON deliveries (user_id, updated_at);
