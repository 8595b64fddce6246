-- +goose Up
-- A COUNT meter takes no value: meter.Validate now refuses one, so a
-- meter stored with one would stop every meter from loading. Before, the
-- admin API stored it, and a value over a dimension quietly kept only the
-- events whose value was a whole number; such a meter now counts all of its
-- events, and its rollups follow once `tollgate aggregate rebuild --meter`
-- recomputes them.
UPDATE meters SET definition = definition - 'value'
WHERE definition ->> 'aggregation' = 'COUNT' AND definition ? 'value';

-- +goose Down
-- The values removed are not kept; there is nothing to put back.
