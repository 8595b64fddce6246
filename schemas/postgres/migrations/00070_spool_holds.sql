-- +goose Up
-- An edge instance whose events wait in its local spool (Kafka was
-- unreachable) holds usage from `since` on: those events reach Kafka later,
-- with record times no watermark can see yet. The invoicer closes no period
-- past a hold. Once the spool has drained, `released_at` is when Kafka took
-- the last of them; the hold lasts until the usage watermark passes it, when
-- the invoicer removes the row.
CREATE TABLE edge_spool_holds (
    instance    text PRIMARY KEY,
    since       timestamptz NOT NULL,
    released_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE edge_spool_holds;
