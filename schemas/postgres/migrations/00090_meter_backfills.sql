-- +goose Up
-- When an admin-API meter's rollups were last computed from the raw events
-- that landed before it existed. The aggregator sets it once a backfill has
-- finished; a meter without it (its aggregator stopped mid-backfill) is
-- backfilled again when an aggregator starts. Meters stored before this
-- column are taken as backfilled: their backfill ran when they were made.
ALTER TABLE meters ADD COLUMN backfilled_at timestamptz;
UPDATE meters SET backfilled_at = created_at;

-- +goose Down
ALTER TABLE meters DROP COLUMN backfilled_at;
