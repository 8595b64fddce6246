-- +goose Up
-- A change to an account's time zone moves its quota months, and the edge
-- caches the zone with the account's keys: announce it, as a change to a
-- subscription is (00010), so that every edge drops them at once rather
-- than when their cache entries expire.
-- +goose StatementBegin
CREATE FUNCTION tollgate_edge_notify_account_zone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_edge', 'account:' || NEW.id);
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER accounts_zone_notify_edge
    AFTER UPDATE OF timezone ON accounts
    FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
    EXECUTE FUNCTION tollgate_edge_notify_account_zone();

-- +goose Down
DROP TRIGGER accounts_zone_notify_edge ON accounts;
DROP FUNCTION tollgate_edge_notify_account_zone();
