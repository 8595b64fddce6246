-- +goose Up
-- Failed authentications are recorded folded, but a network making up keys
-- still writes rows every second to every edge instance, for as long as it
-- goes on, and audit_log refused every DELETE: the table could only grow.
-- Rows of failed authentications at least a day old may now be deleted,
-- and only by a transaction that says so (tollgate audit prune sets
-- tollgate.prune_failed_auth): a guard against mistakes, not against the
-- table's owner. Key events, fresher rows, and every UPDATE stay refused,
-- and TRUNCATE, which row triggers never saw, is refused too.
-- +goose StatementBegin
CREATE FUNCTION audit_log_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.action IN ('auth.failed', 'admin.auth_failed')
        AND OLD.at < now() - interval '1 day'
        AND current_setting('tollgate.prune_failed_auth', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;
-- +goose StatementEnd

DROP TRIGGER audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_guard();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- The prune finds the old rows of failed authentications without reading
-- the key events. Built in the migration's transaction: on a very large
-- table, new audit rows (and keys, whose audit row is in their own
-- transaction) wait while it builds.
CREATE INDEX audit_log_failed_auth_at ON audit_log (at) WHERE action IN ('auth.failed', 'admin.auth_failed');

-- +goose Down
DROP INDEX audit_log_failed_auth_at;
DROP TRIGGER audit_log_no_truncate ON audit_log;
DROP TRIGGER audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
DROP FUNCTION audit_log_guard();
