-- +goose Up
-- Whether an admin-API meter's rollups were computed from the raw events
-- that landed before it existed. An aggregator claims a backfill
-- (backfill_claim) when it starts one and sets backfilled_at when both its
-- passes have finished, if its claim still stands: a backfill's first pass
-- deletes the meter's rows, so one claimed later (another aggregator
-- starting meanwhile) may have deleted what the earlier one wrote. A
-- meter without backfilled_at (its aggregator stopped mid-backfill) is
-- backfilled again when an aggregator starts. Meters stored before these
-- columns are taken as backfilled: their backfill ran when they were made.
ALTER TABLE meters ADD COLUMN backfill_claim uuid, ADD COLUMN backfilled_at timestamptz;
UPDATE meters SET backfilled_at = created_at;

-- +goose Down
ALTER TABLE meters DROP COLUMN backfill_claim, DROP COLUMN backfilled_at;
