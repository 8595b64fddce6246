-- +goose Up
-- The definition each meter of the configuration file had when its rollups
-- were last computed from the raw events. A meter that is new to the file
-- is backfilled; one whose definition changed has its rollups replaced.
CREATE TABLE config_meters (
    key          text PRIMARY KEY,
    definition   jsonb NOT NULL,
    rolled_up_at timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE config_meters;
