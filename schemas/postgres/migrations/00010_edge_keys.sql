-- +goose Up
-- Key lifecycle for the edge: rolled keys remember their predecessor, and
-- every change to a key (or to an account's subscription, which sets its
-- limits) is announced on the tollgate_edge channel so that every edge
-- instance drops its cached copy at once. The payload is "key:<hex hash>" or
-- "account:<id>"; it never carries a secret.

ALTER TABLE api_keys ADD COLUMN rolled_from text REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN created_by text NOT NULL DEFAULT '';

-- +goose StatementBegin
CREATE FUNCTION tollgate_edge_notify_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_edge', 'key:' || encode(OLD.hash, 'hex'));
        RETURN OLD;
    END IF;
    PERFORM pg_notify('tollgate_edge', 'key:' || encode(NEW.hash, 'hex'));
    RETURN NEW;
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER api_keys_notify_edge
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_edge_notify_key();

-- +goose StatementBegin
CREATE FUNCTION tollgate_edge_notify_account() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_edge', 'account:' || OLD.account_id);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('tollgate_edge', 'account:' || NEW.account_id);
    RETURN NEW;
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER subscriptions_notify_edge
    AFTER INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION tollgate_edge_notify_account();

CREATE INDEX audit_log_action ON audit_log (action, at);

-- +goose Down
DROP INDEX audit_log_action;
DROP TRIGGER subscriptions_notify_edge ON subscriptions;
DROP FUNCTION tollgate_edge_notify_account();
DROP TRIGGER api_keys_notify_edge ON api_keys;
DROP FUNCTION tollgate_edge_notify_key();
ALTER TABLE api_keys DROP COLUMN created_by;
ALTER TABLE api_keys DROP COLUMN rolled_from;
