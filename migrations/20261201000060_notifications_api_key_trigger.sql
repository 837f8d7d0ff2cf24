-- Performance (issue #5): the accept statement without its last
-- foreign-key check, as `…040` and `…050` did for the other hot inserts.
--
-- Every notification referenced its API key, and every inserted row ran
-- the check: a lookup and a share lock on the key's row. All of a batch's
-- rows, and the batches in flight beside it, lock the same few rows, so
-- each batch wrote WAL for the lock and two batches at once made a
-- multixact. The check cannot fail in practice: the key was just used to
-- authenticate the request, and Herald never deletes keys (it revokes
-- them).
--
-- Deleting a key by hand still clears it from its notifications, as
-- `ON DELETE SET NULL` did: a statement-level trigger, which costs nothing
-- on insert.
ALTER TABLE notifications DROP CONSTRAINT notifications_api_key_id_fkey;

CREATE FUNCTION notifications_forget_api_keys() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE notifications SET api_key_id = NULL WHERE api_key_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_delete_forget
    AFTER DELETE ON api_keys
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_forget_api_keys();
