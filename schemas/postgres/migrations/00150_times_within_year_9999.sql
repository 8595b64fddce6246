-- +goose Up
-- A key's expiry and a subscription's bounds are set through the admin APIs,
-- which keep them to real dates, but an operator may set them by hand. A
-- time past the year 9999 (or 'infinity') cannot be written as an RFC 3339
-- time, so one such row broke every admin view that lists it, and the
-- edge's lookup of the key. The bounds now refuse such times (a key or a
-- subscription that never ends has none). NOT VALID here; 00160 brings the
-- rows written before into range and validates them.
ALTER TABLE api_keys ADD CONSTRAINT api_keys_expires_at_in_range
    CHECK (expires_at >= '0001-01-01 00:00:00+00' AND expires_at < '10000-01-01 00:00:00+00') NOT VALID;
ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_bounds_in_range
    CHECK (starts_at >= '0001-01-01 00:00:00+00' AND starts_at < '10000-01-01 00:00:00+00'
       AND (ends_at >= '0001-01-01 00:00:00+00' AND ends_at < '10000-01-01 00:00:00+00')) NOT VALID;

-- +goose Down
ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_bounds_in_range;
ALTER TABLE api_keys DROP CONSTRAINT api_keys_expires_at_in_range;
