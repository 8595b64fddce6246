-- +goose Up
-- A `tollgate aggregate rebuild` records the meters and the range of window
-- starts whose rollups it is about to delete, before it deletes them, and
-- removes the record once they are rebuilt. A record left behind is a
-- rebuild that never finished (the process killed, the host lost): the
-- usage API reports those meters as backfilling, and an aggregator that
-- starts says which rebuild to run again.
CREATE TABLE rollup_rebuilds (
    id         uuid PRIMARY KEY,
    meters     text[] NOT NULL,
    from_start timestamptz NOT NULL,
    to_start   timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE rollup_rebuilds;
