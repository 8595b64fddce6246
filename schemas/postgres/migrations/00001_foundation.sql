-- +goose Up
-- The system of record for accounts, keys, plans, subscriptions, the invoice
-- ledger and the audit log. Later migrations extend these tables; none may
-- rewrite this file once released.

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    name        text NOT NULL,
    email       text,
    -- IANA zone for month boundaries and invoice periods.
    timezone    text NOT NULL DEFAULT 'UTC',
    currency    text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every account has a live and a test environment. Test traffic is metered,
-- never billed.
CREATE TABLE environments (
    account_id  text NOT NULL REFERENCES accounts (id),
    mode        text NOT NULL CHECK (mode IN ('live', 'test')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, mode)
);

-- API keys are stored only as SHA-256 hashes of the full secret. The prefix
-- (for example "sk_live_AbC1") is kept so people can tell keys apart.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    account_id    text NOT NULL,
    environment   text NOT NULL CHECK (environment IN ('live', 'test')),
    kind          text NOT NULL CHECK (kind IN ('publishable', 'secret')),
    display_prefix text NOT NULL,
    hash          bytea NOT NULL UNIQUE CHECK (length(hash) = 32),
    scopes        text[] NOT NULL DEFAULT '{}',
    name          text NOT NULL DEFAULT '',
    expires_at    timestamptz,
    revoked_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, environment) REFERENCES environments (account_id, mode)
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Plans are versioned and never edited in place: a price change is a new
-- version. The pricing definition is exact JSON (integer minor units or
-- decimal strings, never floats).
CREATE TABLE plans (
    id          text NOT NULL,
    version     integer NOT NULL CHECK (version > 0),
    name        text NOT NULL,
    currency    text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, version)
);

CREATE TABLE subscriptions (
    id            text PRIMARY KEY,
    account_id    text NOT NULL REFERENCES accounts (id),
    plan_id       text NOT NULL,
    plan_version  integer NOT NULL,
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (plan_id, plan_version) REFERENCES plans (id, version),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
CREATE INDEX subscriptions_account ON subscriptions (account_id, starts_at);

-- The ledger is append-only: corrections are new entries (credit notes,
-- adjustments), never edits. The trigger below enforces it.
CREATE TABLE ledger_entries (
    id            bigserial PRIMARY KEY,
    account_id    text NOT NULL REFERENCES accounts (id),
    kind          text NOT NULL,
    invoice_id    text,
    amount_minor  bigint NOT NULL DEFAULT 0,
    currency      text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    payload       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, created_at);
CREATE INDEX ledger_entries_invoice ON ledger_entries (invoice_id);

-- +goose StatementBegin
CREATE FUNCTION forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- Every key event and every failed authentication. Never holds a secret:
-- at most the display prefix of a key.
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    account_id   text,
    key_id       text,
    key_prefix   text,
    remote_addr  text,
    reason       text,
    details      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_account ON audit_log (account_id, at);

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- +goose Down
DROP TABLE audit_log;
DROP TABLE ledger_entries;
DROP FUNCTION forbid_change();
DROP TABLE subscriptions;
DROP TABLE plans;
DROP TABLE api_keys;
DROP TABLE environments;
DROP TABLE accounts;
