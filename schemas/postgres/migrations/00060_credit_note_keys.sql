-- +goose Up
-- A credit note may carry the caller's idempotency key (payload
-- idempotency_key): a retried command then finds the credit note its
-- first run appended instead of appending a second one. One key names one
-- credit note, whatever the invoice.
CREATE UNIQUE INDEX ledger_entries_credit_note_key ON ledger_entries ((payload ->> 'idempotency_key'))
    WHERE kind = 'credit_note' AND payload ? 'idempotency_key';

-- +goose Down
DROP INDEX ledger_entries_credit_note_key;
