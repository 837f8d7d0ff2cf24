-- Performance (issue #5): a delivery's id names its notification and
-- channel, so the primary key finds a notification's deliveries and the
-- `(notification_id, channel)` unique index goes.
--
-- Every version of a delivery row paid for that index: the insert, the
-- claim and the result each added an entry and, the index being unique,
-- first looked up the entries already there for the same key (and their
-- heap tuples). In the bench's database ceiling, dropping it raised
-- Herald's own statements from 10,900–11,000 to 12,800–13,500 deliveries/s
-- per core of Postgres in the drain, and from 12,900–13,400 to
-- 15,600–17,000 notifications/s per core in the ingest.
--
-- New ids (`herald_core::DeliveryId::of`): a notification's ULID ends in
-- the base32 digit 0 (its last five bits are zero), and each of its
-- deliveries has the same ULID with that digit replaced by the channel's:
-- 1 email, 2 push, 3 in-app. So `dlv_` + the notification's first 25
-- digits + the channel digit; unique because the notification's id is.
--
-- Deliveries written before this migration (and any written with an id of
-- its own, such as a test fixture's) keep their random ids; a partial
-- index finds those by notification. An id follows its notification's when
-- it is full length (30 characters) and has the same first 25 digits. The
-- index holds exactly the rows whose id does not, and since neither column
-- ever changes, no update of a new delivery touches it.

-- The ids a notification's deliveries have when they follow it.
CREATE FUNCTION delivery_ids_of(notification_id TEXT) RETURNS TEXT[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[
    'dlv_' || substr(notification_id, 5, 25) || '1',
    'dlv_' || substr(notification_id, 5, 25) || '2',
    'dlv_' || substr(notification_id, 5, 25) || '3'
];

-- An id that follows its notification carries the right channel digit, so
-- the primary key keeps one delivery per notification and channel.
ALTER TABLE deliveries ADD CONSTRAINT deliveries_id_follows_notification CHECK (
    (substr(id, 5, 25) <> substr(notification_id, 5, 25) OR length(id) <> 30)
    OR right(id, 1) = CASE channel WHEN 'email' THEN '1' WHEN 'push' THEN '2' ELSE '3' END
);

CREATE INDEX deliveries_notification_legacy ON deliveries (notification_id)
    WHERE (substr(id, 5, 25) <> substr(notification_id, 5, 25) OR length(id) <> 30);

ALTER TABLE deliveries DROP CONSTRAINT deliveries_notification_id_channel_key;

-- A notification's deliveries, either way: by primary key, plus those the
-- partial index holds. Inlined into the calling query (one SELECT, STABLE).
CREATE FUNCTION deliveries_of(ntf TEXT) RETURNS SETOF deliveries
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT * FROM deliveries WHERE id = ANY(delivery_ids_of(ntf)) AND notification_id = ntf
    UNION ALL
    SELECT * FROM deliveries
    WHERE notification_id = ntf AND (substr(id, 5, 25) <> substr(notification_id, 5, 25) OR length(id) <> 30)
$$;

-- Deleting notifications deletes their deliveries (the trigger of
-- migration …040), found the same two ways.
CREATE OR REPLACE FUNCTION deliveries_follow_notifications() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM deliveries
    WHERE id IN (SELECT unnest(delivery_ids_of(id)) FROM gone) AND notification_id IN (SELECT id FROM gone);
    DELETE FROM deliveries
    WHERE notification_id IN (SELECT id FROM gone)
      AND (substr(id, 5, 25) <> substr(notification_id, 5, 25) OR length(id) <> 30);
    RETURN NULL;
END
$$;
