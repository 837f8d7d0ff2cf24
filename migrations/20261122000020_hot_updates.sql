-- Performance (issue #5): fewer index entries per delivery state change.
--
-- A delivery row is rewritten several times (queued → enqueued mark →
-- sending → final). Postgres can keep a rewrite on the same page without
-- touching any index (a HOT update) when no indexed column changes and the
-- page has room. The enqueue mark (`enqueued_at`) and the completion of an
-- attempt row change no indexed column, so leaving a fifth of each page
-- free turns them into HOT updates.
ALTER TABLE deliveries SET (fillfactor = 80);
ALTER TABLE delivery_attempts SET (fillfactor = 80);

-- Every row version of a delivery paid for two per-user indexes. The
-- clients' `(user_id, updated_at)` one serves the per-user admin filter as
-- well: a user has few deliveries, sorted after the index scan.
DROP INDEX deliveries_user;
