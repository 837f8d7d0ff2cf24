-- Performance (issue #5): the workers' writes without foreign-key checks,
-- keeping the cascades, as `…040` did for the accept statement.
--
-- Every claim inserts an attempt per delivery, and every in-app delivery
-- inserts an inbox item. Their foreign keys checked each row: a lookup of
-- the delivery (already updated by the same statement) and, for an inbox
-- item, a share lock on the notification row, which dirties the
-- notification's page and writes WAL for it. Neither check can fail:
-- attempts are inserted only from the deliveries the same statement just
-- claimed, and inbox items only from the notifications of the deliveries it
-- just delivered (`herald_db::deliveries`).
--
-- Deleting still cascades (a purge deletes dead letters with their
-- attempts; deleting a notification deletes its deliveries, their attempts
-- and its inbox item): statement-level triggers, which cost nothing on
-- insert.
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_delivery_id_fkey;
ALTER TABLE inbox_items DROP CONSTRAINT inbox_items_notification_id_fkey;

CREATE FUNCTION attempts_follow_deliveries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_delete_attempts
    AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION attempts_follow_deliveries();

CREATE FUNCTION inbox_follows_notifications() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM inbox_items WHERE notification_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_delete_inbox_items
    AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION inbox_follows_notifications();
