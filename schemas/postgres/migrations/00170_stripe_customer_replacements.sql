-- +goose Up
-- A Stripe customer deleted in Stripe's dashboard is replaced, for the
-- account's invoices not yet in Stripe, by a new customer. stripe_customers
-- keeps the account's first customer (append-only); each replacement is a
-- row here, naming the customer it replaces, so the account's customer is
-- the end of the chain that starts at its first one. The first replacement
-- recorded for a customer wins, as the first customer recorded does.
CREATE TABLE stripe_customer_replacements (
    account_id   text NOT NULL REFERENCES accounts (id),
    replaced     text NOT NULL,
    customer_id  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, replaced)
);

CREATE TRIGGER stripe_customer_replacements_append_only BEFORE UPDATE OR DELETE ON stripe_customer_replacements
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- +goose Down
DROP TABLE stripe_customer_replacements;
