-- +goose Up
-- Rows written out of range before 00150 (a key expiry or a subscription
-- bound past the year 9999, or at ±infinity) are brought into range, and the
-- bounds validated. 00150 left them as they were, but Postgres checks even a
-- NOT VALID constraint on every new version of a row, so such a key could no
-- longer be revoked: the revoke's UPDATE failed and the key stayed active.
-- A key that never expires has no expiry; one set past the year 9999 expires
-- at its last second; one set before the year 1 has long expired. Each row
-- changed is in the audit log, with what it held before.
WITH old AS (
    SELECT id, expires_at::text AS before FROM api_keys
    WHERE NOT (expires_at >= '0001-01-01 00:00:00+00' AND expires_at < '10000-01-01 00:00:00+00')
    FOR UPDATE
), repaired AS (
    UPDATE api_keys k SET expires_at = CASE
            WHEN k.expires_at = 'infinity' THEN NULL
            WHEN k.expires_at >= '10000-01-01 00:00:00+00' THEN '9999-12-31 23:59:59+00'::timestamptz
            ELSE '0001-01-01 00:00:00+00'::timestamptz
        END
    FROM old WHERE k.id = old.id
    RETURNING k.id, k.account_id, k.display_prefix, k.expires_at, old.before
)
INSERT INTO audit_log (actor, action, account_id, key_id, key_prefix, reason, details)
SELECT 'migration 00160', 'key.expiry_repaired', account_id, id, display_prefix,
       'expiry out of range (before the year 1, past the year 9999, or infinite)',
       jsonb_build_object('expires_at', expires_at, 'expires_at_before', before)
FROM repaired;

WITH old AS (
    SELECT id, starts_at::text AS starts_before, ends_at::text AS ends_before FROM subscriptions
    WHERE NOT (starts_at >= '0001-01-01 00:00:00+00' AND starts_at < '10000-01-01 00:00:00+00')
       OR NOT (ends_at >= '0001-01-01 00:00:00+00' AND ends_at < '10000-01-01 00:00:00+00')
    FOR UPDATE
), repaired AS (
    UPDATE subscriptions s SET
        starts_at = LEAST(GREATEST(s.starts_at, '0001-01-01 00:00:00+00'), '9999-12-31 23:59:58+00'),
        ends_at = CASE
            WHEN s.ends_at IS NULL OR s.ends_at >= '10000-01-01 00:00:00+00' THEN NULL
            ELSE GREATEST(s.ends_at, '0001-01-01 00:00:01+00')
        END
    FROM old WHERE s.id = old.id
    RETURNING s.id, s.account_id, s.starts_at, s.ends_at, old.starts_before, old.ends_before
)
INSERT INTO audit_log (actor, action, account_id, reason, details)
SELECT 'migration 00160', 'subscription.bounds_repaired', account_id,
       'start or end out of range (before the year 1, past the year 9999, or infinite)',
       jsonb_build_object('subscription_id', id, 'starts_at', starts_at, 'ends_at', ends_at,
                          'starts_at_before', starts_before, 'ends_at_before', ends_before)
FROM repaired;

ALTER TABLE api_keys VALIDATE CONSTRAINT api_keys_expires_at_in_range;
ALTER TABLE subscriptions VALIDATE CONSTRAINT subscriptions_bounds_in_range;

-- +goose Down
-- The repaired rows keep their repair; the bounds stay (00150 drops them).
SELECT 1;
