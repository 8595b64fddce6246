-- +goose Up
-- Rows written out of range before 00150 (a key expiry or a subscription
-- bound past the year 9999, or at ±infinity) are brought into range, and the
-- bounds validated. 00150 left them as they were, but Postgres checks even a
-- NOT VALID constraint on every new version of a row, so such a key could no
-- longer be revoked: the revoke's UPDATE failed and the key stayed active.
-- A key that never expires has no expiry; one set past the year 9999 expires
-- at its last second; one set before the year 1 has long expired. Each key
-- changed is in the audit log.
WITH repaired AS (
    UPDATE api_keys SET expires_at = CASE
            WHEN expires_at = 'infinity' THEN NULL
            WHEN expires_at >= '10000-01-01 00:00:00+00' THEN '9999-12-31 23:59:59+00'::timestamptz
            ELSE '0001-01-01 00:00:00+00'::timestamptz
        END
    WHERE NOT (expires_at >= '0001-01-01 00:00:00+00' AND expires_at < '10000-01-01 00:00:00+00')
    RETURNING id, account_id, display_prefix, expires_at
)
INSERT INTO audit_log (actor, action, account_id, key_id, key_prefix, reason, details)
SELECT 'migration 00160', 'key.expiry_repaired', account_id, id, display_prefix,
       'expiry out of range (before the year 1, past the year 9999, or infinite)',
       jsonb_build_object('expires_at', expires_at)
FROM repaired;

UPDATE subscriptions SET
    starts_at = LEAST(GREATEST(starts_at, '0001-01-01 00:00:00+00'), '9999-12-31 23:59:58+00'),
    ends_at = CASE
        WHEN ends_at IS NULL OR ends_at >= '10000-01-01 00:00:00+00' THEN NULL
        ELSE GREATEST(ends_at, '0001-01-01 00:00:01+00')
    END
WHERE NOT (starts_at >= '0001-01-01 00:00:00+00' AND starts_at < '10000-01-01 00:00:00+00')
   OR NOT (ends_at >= '0001-01-01 00:00:00+00' AND ends_at < '10000-01-01 00:00:00+00');

ALTER TABLE api_keys VALIDATE CONSTRAINT api_keys_expires_at_in_range;
ALTER TABLE subscriptions VALIDATE CONSTRAINT subscriptions_bounds_in_range;

-- +goose Down
-- The repaired rows keep their repair; the bounds stay (00150 drops them).
SELECT 1;
