-- +goose Up
-- Meters defined through the aggregator's admin API (meters in the
-- configuration file are not stored here). A meter is never edited: its
-- definition decides what past invoices counted, so a change is a new meter.
CREATE TABLE meters (
    key         text PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_]{0,62}$'),
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE meters;
