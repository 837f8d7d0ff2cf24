-- Performance (issue #5), and one lock order whatever the server's locale:
-- identifiers and codes compare byte by byte.
--
-- Every text column Herald looks rows up by, joins on or sorts by holds an
-- ASCII token (a prefixed ULID, a status, a channel, a key), yet compared
-- under the database's collation. Postgres 15 takes only "C" and "POSIX"
-- as bytewise: under C.UTF-8 (Debian's default) or en_US.UTF-8 each index
-- comparison copies both strings and calls strcoll. A drain's profile had
-- that path (`varstr_cmp`, `strcoll_l`, `pg_newlocale_from_collation`
-- under `_bt_compare`) in the top of Postgres's own time.
--
-- "C" also makes the index order of ids the byte order in which the
-- batched statements sort them before they lock rows
-- (`deliveries::in_lock_order`), on any server; under a linguistic
-- collation the two orders could differ.
--
-- Only the collation changes (the values and their type stay): Postgres
-- rewrites no table, it rebuilds the indexes on these columns. Columns
-- compared with each other change together, so that every join still
-- uses its index. Free text (titles, bodies, errors) keeps the database's
-- collation.
ALTER TABLE api_keys
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN prefix TYPE text COLLATE "C";
ALTER TABLE users
    ALTER COLUMN id TYPE text COLLATE "C";
ALTER TABLE devices
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN provider TYPE text COLLATE "C",
    ALTER COLUMN token TYPE text COLLATE "C";
ALTER TABLE notifications
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN api_key_id TYPE text COLLATE "C",
    ALTER COLUMN priority TYPE text COLLATE "C";
ALTER TABLE deliveries
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN notification_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN channel TYPE text COLLATE "C",
    ALTER COLUMN priority TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";
ALTER TABLE delivery_attempts
    ALTER COLUMN delivery_id TYPE text COLLATE "C";
ALTER TABLE inbox_items
    ALTER COLUMN notification_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE idempotency_keys
    ALTER COLUMN api_key_id TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C";
ALTER TABLE replays
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN api_key_id TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";
ALTER TABLE replay_items
    ALTER COLUMN replay_id TYPE text COLLATE "C",
    ALTER COLUMN delivery_id TYPE text COLLATE "C";
ALTER TABLE purges
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN api_key_id TYPE text COLLATE "C";
