-- +goose Up
-- When this ledger first ran with Stripe configured, and in which mode
-- (the key's: live or test). Invoices finalized before it are not sent to
-- Stripe: a ledger kept without a key for months would otherwise have
-- every past invoice created and charged at once when a key is set. A key
-- of the other mode is refused: test-mode customers and invoices are not
-- the live ones. A ledger that has synced before this table existed
-- starts at the epoch, in the mode of the first key it runs with next.
CREATE TABLE stripe_sync_start (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    started_at timestamptz NOT NULL DEFAULT now(),
    mode       text NOT NULL CHECK (mode IN ('live', 'test', ''))
);
INSERT INTO stripe_sync_start (started_at, mode)
SELECT 'epoch', '' WHERE EXISTS (SELECT 1 FROM ledger_entries WHERE kind = 'invoice.synced');

-- +goose Down
DROP TABLE stripe_sync_start;
