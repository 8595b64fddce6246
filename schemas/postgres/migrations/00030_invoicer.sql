-- +goose Up
-- The invoicer: seeded plans, invoices and their lines, Stripe sync state and
-- Stripe webhook events. Every table here is append-only (trigger
-- forbid_change from 00001): an invoice is never edited, a correction is a
-- credit note in ledger_entries, and each Stripe step is a new row.

-- Tier plans, version 1. Amounts are integer minor units; unit amounts are
-- exact decimal strings in minor units ("0.04" cents = $0.0004 per call).
-- definition->'limits' is read by the edge.
INSERT INTO plans (id, version, name, currency, definition) VALUES
('free', 1, 'Free', 'usd', '{
  "limits": {"requests_per_second": 5, "burst": 10, "monthly_requests": 1000},
  "upgrade_url": "https://tollgate.dev/pricing",
  "prices": [
    {"key": "api_calls", "description": "API calls", "model": "per_unit", "meter": "api_calls", "unit_amount": "0"}
  ]}'),
('starter', 1, 'Starter', 'usd', '{
  "limits": {"requests_per_second": 20, "burst": 40, "monthly_requests": null},
  "upgrade_url": "https://tollgate.dev/pricing",
  "prices": [
    {"key": "base", "description": "Starter plan", "model": "flat", "amount": 2900},
    {"key": "api_calls", "description": "API calls over 100,000", "model": "per_unit", "meter": "api_calls",
     "unit_amount": "0.04", "included": 100000}
  ]}'),
('growth', 1, 'Growth', 'usd', '{
  "limits": {"requests_per_second": 100, "burst": 200, "monthly_requests": null},
  "upgrade_url": "https://tollgate.dev/pricing",
  "prices": [
    {"key": "base", "description": "Growth plan", "model": "flat", "amount": 9900},
    {"key": "api_calls", "description": "API calls", "model": "graduated", "meter": "api_calls", "tiers": [
      {"up_to": 1000000, "unit_amount": "0"},
      {"up_to": 10000000, "unit_amount": "0.03"},
      {"up_to": null, "unit_amount": "0.02"}
    ]}
  ]}'),
('enterprise', 1, 'Enterprise', 'usd', '{
  "limits": {"requests_per_second": 1000, "burst": 2000, "monthly_requests": null},
  "custom": true,
  "prices": [
    {"key": "base", "description": "Enterprise platform fee", "model": "flat", "amount": 0},
    {"key": "api_calls", "description": "API calls", "model": "volume", "meter": "api_calls", "tiers": [
      {"up_to": 100000000, "unit_amount": "0.015"},
      {"up_to": null, "unit_amount": "0.01"}
    ]}
  ]}')
ON CONFLICT (id, version) DO NOTHING;

CREATE TRIGGER plans_append_only
    BEFORE UPDATE OR DELETE ON plans
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- One invoice per account and period, whatever retries happen.
CREATE TABLE invoices (
    id                text PRIMARY KEY,
    account_id        text NOT NULL REFERENCES accounts (id),
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    currency          text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    total_minor       bigint NOT NULL,
    fingerprint_hash  text NOT NULL,
    -- The whole computed invoice (lines, tier breakdown, fingerprint).
    document          jsonb NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, period_start),
    CHECK (period_end > period_start)
);

CREATE TABLE invoice_lines (
    invoice_id    text NOT NULL REFERENCES invoices (id),
    line_no       integer NOT NULL CHECK (line_no > 0),
    price_key     text NOT NULL,
    description   text NOT NULL,
    model         text NOT NULL,
    meter         text,
    plan_id       text NOT NULL,
    plan_version  integer NOT NULL,
    quantity      bigint NOT NULL,
    billable      bigint NOT NULL,
    unit_amount   numeric,
    amount_exact  numeric NOT NULL,
    amount_minor  bigint NOT NULL,
    tiers         jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (invoice_id, line_no)
);

-- A ledger entry of these kinds exists at most once per invoice, so a
-- retried step cannot append it twice.
CREATE UNIQUE INDEX ledger_entries_invoice_once ON ledger_entries (invoice_id, kind)
    WHERE kind IN ('invoice.draft', 'invoice.finalized', 'invoice.synced');

-- Stripe customer per account.
CREATE TABLE stripe_customers (
    account_id   text PRIMARY KEY REFERENCES accounts (id),
    customer_id  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Every Stripe step of every invoice, written right after Stripe answered:
-- step is 'invoice', 'item:<line_no>' or 'finalize'. A restarted invoicer
-- resumes after the last step found here; the idempotency key of each call
-- makes the step it was in when it crashed safe to repeat.
CREATE TABLE stripe_sync_steps (
    invoice_id   text NOT NULL REFERENCES invoices (id),
    step         text NOT NULL,
    stripe_id    text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (invoice_id, step)
);

-- Verified Stripe webhook events, once per event id.
CREATE TABLE stripe_webhook_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    object_id    text NOT NULL DEFAULT '',
    invoice_id   text,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER invoices_append_only BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER invoice_lines_append_only BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER stripe_customers_append_only BEFORE UPDATE OR DELETE ON stripe_customers
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER stripe_sync_steps_append_only BEFORE UPDATE OR DELETE ON stripe_sync_steps
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER stripe_webhook_events_append_only BEFORE UPDATE OR DELETE ON stripe_webhook_events
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- +goose Down
DROP TABLE stripe_webhook_events;
DROP TABLE stripe_sync_steps;
DROP TABLE stripe_customers;
DROP INDEX ledger_entries_invoice_once;
DROP TABLE invoice_lines;
DROP TABLE invoices;
DROP TRIGGER plans_append_only ON plans;
-- Seeded plans stay: subscriptions may reference them.
