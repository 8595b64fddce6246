-- +goose Up
-- A key is rolled once: its replacement carries its expiry, and a second
-- roll of the same key would have given the new key the old one's overlap
-- deadline instead. Roll the replacement to rotate again.
CREATE UNIQUE INDEX api_keys_rolled_from_once ON api_keys (rolled_from) WHERE rolled_from IS NOT NULL;

-- +goose Down
DROP INDEX api_keys_rolled_from_once;
