-- +goose Up
-- An account's hour, day and month rollups are computed on its time zone's
-- grid. When the zone changes, an aggregator re-rolls the account's
-- coarser windows from its minute rows once every ingest process has the
-- new zone (aggregator.zone_cache_ttl). timezone_changed_at records the
-- change; rollups_rezoned_for is the timezone_changed_at the last finished
-- re-roll was for (they differ while one is owed), rollups_rezoned_at when
-- it finished. A re-roll runs in two passes; rollups_first_pass_for and
-- rollups_first_pass_at record the first, so that one aggregator runs it
-- and every aggregator times the second from it.
ALTER TABLE accounts ADD COLUMN timezone_changed_at timestamptz, ADD COLUMN rollups_rezoned_for timestamptz,
    ADD COLUMN rollups_rezoned_at timestamptz, ADD COLUMN rollups_first_pass_for timestamptz,
    ADD COLUMN rollups_first_pass_at timestamptz;
-- Every aggregator looks for accounts owed a re-roll every few seconds, and
-- the usage API once a second: they read this index, not every account.
CREATE INDEX accounts_rezone_owed ON accounts (id)
    WHERE timezone_changed_at IS NOT NULL AND timezone_changed_at IS DISTINCT FROM rollups_rezoned_for;
-- +goose StatementBegin
CREATE FUNCTION tollgate_account_zone_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.timezone_changed_at := clock_timestamp();
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER accounts_zone_changed
    BEFORE UPDATE OF timezone ON accounts
    FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
    EXECUTE FUNCTION tollgate_account_zone_changed();

-- +goose Down
DROP INDEX accounts_rezone_owed;
DROP TRIGGER accounts_zone_changed ON accounts;
DROP FUNCTION tollgate_account_zone_changed();
ALTER TABLE accounts DROP COLUMN timezone_changed_at, DROP COLUMN rollups_rezoned_for, DROP COLUMN rollups_rezoned_at,
    DROP COLUMN rollups_first_pass_for, DROP COLUMN rollups_first_pass_at;
