-- +goose Up
-- A key create may carry an Idempotency-Key: a retry after a lost answer
-- finds the key the first request made, instead of making a second key
-- whose secret nobody holds. The key is the account's own (two accounts
-- may use the same one), and it stays bound to its key for good: keys are
-- made seldom, and a retry may come much later. request_hash is SHA-256 of
-- the request as the admin API read it, so the same Idempotency-Key with
-- other parameters is refused, not answered with a key nobody asked for.
ALTER TABLE api_keys ADD COLUMN idempotency_key text;
ALTER TABLE api_keys ADD COLUMN request_hash bytea;
-- NOT VALID: every existing row holds neither, so no row needs checking.
-- The migration still holds the table's lock while the index below is
-- built, which reads every key: on a table of millions of keys, edges'
-- key lookups that miss their cache wait a second or so.
ALTER TABLE api_keys ADD CONSTRAINT api_keys_idempotency_request
    CHECK ((idempotency_key IS NULL) = (request_hash IS NULL)) NOT VALID;
CREATE UNIQUE INDEX api_keys_idempotency ON api_keys (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- +goose Down
DROP INDEX api_keys_idempotency;
ALTER TABLE api_keys DROP CONSTRAINT api_keys_idempotency_request;
ALTER TABLE api_keys DROP COLUMN request_hash;
ALTER TABLE api_keys DROP COLUMN idempotency_key;
