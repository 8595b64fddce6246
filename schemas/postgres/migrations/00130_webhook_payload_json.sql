-- +goose Up
-- A Stripe event is kept as Stripe sent it, byte for byte. jsonb refuses
-- the escape \u0000, which is valid JSON and may reach an event through a
-- field a customer filled in: the event could not be stored, was answered
-- 500, and Stripe sent it again for days. json keeps the text as it came.
ALTER TABLE stripe_webhook_events ALTER COLUMN payload TYPE json USING payload::json;

-- +goose Down
ALTER TABLE stripe_webhook_events ALTER COLUMN payload TYPE jsonb USING payload::jsonb;
