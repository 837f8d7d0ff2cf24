-- Performance (issue #5): one row per accepted batch instead of a second
-- write to every delivery.
--
-- The API pushes a batch's jobs to Redis after the commit. Until now it
-- then marked each delivery enqueued (`enqueued_at`), so the sweeper could
-- tell a delivery whose push never happened (a crash between commit and
-- push, Redis down) from one waiting its turn in Redis. That mark rewrote
-- every delivery row a second time, mostly outside HOT (a freshly filled
-- page has no room for a new version of each of its rows), and cost
-- Postgres about as much as the insert itself.
--
-- Now the insert sets `enqueued_at` itself and, in the same statement,
-- records the batch here, keyed by its transaction time (which is every
-- delivery's `updated_at`). Once the jobs are in Redis the API deletes the
-- row. A row still here after the sweeper's grace period is a push that
-- never happened or was never confirmed: the sweeper clears the marks of
-- that batch's deliveries still queued, so they are owed a job again.
CREATE TABLE push_intents (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_at  TIMESTAMPTZ NOT NULL      -- the inserting transaction's now()
);
