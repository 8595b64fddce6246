// Package postgres stores the edge's API keys and audit log in Postgres and
// listens for key changes.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/schemas"
)

// KeyStore reads and writes api_keys.
type KeyStore struct {
	pool *pgxpool.Pool
}

var (
	_ edge.KeyStore   = (*KeyStore)(nil)
	_ edge.AdminStore = (*KeyStore)(nil)
)

// NewKey is what CreateKey needs to store a key.
type NewKey = edge.NewKey

// NewKeyStore returns a KeyStore over pool.
func NewKeyStore(pool *pgxpool.Pool) *KeyStore { return &KeyStore{pool: pool} }

const keyColumns = `k.id, k.account_id, k.environment, k.kind, k.name, k.display_prefix, k.hash, k.scopes,
	k.expires_at, k.revoked_at, k.created_at, coalesce(k.rolled_from, '')`

func scanKey(row pgx.Row, extra ...any) (edge.Key, error) {
	var k edge.Key
	var env, kind string
	dst := append([]any{&k.ID, &k.AccountID, &env, &kind, &k.Name, &k.DisplayPrefix, &k.Hash, &k.Scopes,
		&k.ExpiresAt, &k.RevokedAt, &k.CreatedAt, &k.RolledFrom}, extra...)
	if err := row.Scan(dst...); err != nil {
		return edge.Key{}, err
	}
	k.Environment, k.Kind = schemas.Environment(env), edge.KeyKind(kind)
	return k, nil
}

// KeyByHash finds the key whose secret hashes to hash, with the account's
// plan in force now: its subscription's plan version, or the newest
// version of "free" when it has none.
func (s *KeyStore) KeyByHash(ctx context.Context, hash [32]byte) (edge.Key, error) {
	var tz, planID string
	var version int
	var limits []byte
	var upgrade string
	var changesIn *float64
	k, err := scanKey(s.pool.QueryRow(ctx, `
		SELECT `+keyColumns+`, a.timezone, coalesce(p.id, s.plan_id, 'free'), coalesce(p.version, 0),
			p.definition->'limits', coalesce(p.definition->>'upgrade_url', ''),
			-- The next start or end of any of the account's subscriptions:
			-- the plan in force may change then, with no notification.
			(SELECT extract(epoch FROM min(CASE WHEN starts_at > now() THEN starts_at ELSE ends_at END) - now())::float8
			 FROM subscriptions WHERE account_id = k.account_id AND (starts_at > now() OR ends_at > now()))
		FROM api_keys k
		JOIN accounts a ON a.id = k.account_id
		LEFT JOIN LATERAL (
			SELECT plan_id, plan_version FROM subscriptions
			WHERE account_id = k.account_id AND starts_at <= now() AND (ends_at IS NULL OR ends_at > now())
			ORDER BY starts_at DESC, created_at DESC LIMIT 1) s ON true -- as the invoicer picks it
		LEFT JOIN LATERAL (
			SELECT id, version, definition FROM plans
			WHERE (s.plan_id IS NOT NULL AND id = s.plan_id AND version = s.plan_version)
			   OR (s.plan_id IS NULL AND id = 'free')
			ORDER BY version DESC LIMIT 1) p ON true
		WHERE k.hash = $1`, hash[:]), &tz, &planID, &version, &limits, &upgrade, &changesIn)
	if errors.Is(err, pgx.ErrNoRows) {
		return edge.Key{}, edge.ErrKeyNotFound
	}
	if err != nil {
		return edge.Key{}, fmt.Errorf("look up key: %w", err)
	}
	k.AccountTimezone = tz
	k.Plan = edge.Plan{ID: planID, Version: version, UpgradeURL: upgrade}
	if changesIn != nil {
		// At least a microsecond: 0 would say that nothing is scheduled.
		k.PlanChangesIn = max(time.Duration(*changesIn*float64(time.Second)), time.Microsecond)
	}
	if len(limits) > 0 && string(limits) != "null" {
		if err := json.Unmarshal(limits, &k.Plan.Limits); err != nil {
			return edge.Key{}, fmt.Errorf("plan %s v%d: limits: %w", planID, version, err)
		}
	}
	return k, nil
}

// GetKey returns the key with id.
func (s *KeyStore) GetKey(ctx context.Context, id string) (edge.Key, error) {
	k, err := scanKey(s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM api_keys k WHERE k.id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return edge.Key{}, fmt.Errorf("%w: no key %q", edge.ErrNotFound, id)
	}
	if err != nil {
		return edge.Key{}, fmt.Errorf("get key %s: %w", id, err)
	}
	return k, nil
}

// ListKeys returns every key of an account, newest first.
func (s *KeyStore) ListKeys(ctx context.Context, accountID string) ([]edge.Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM api_keys k WHERE k.account_id = $1
		ORDER BY k.created_at DESC, k.id`, accountID)
	if err != nil {
		return nil, fmt.Errorf("list keys of %s: %w", accountID, err)
	}
	defer rows.Close()
	out := []edge.Key{}
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, fmt.Errorf("list keys of %s: %w", accountID, err)
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list keys of %s: %w", accountID, err)
	}
	if len(out) == 0 {
		var exists bool
		if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)`, accountID).Scan(&exists); err != nil {
			return nil, fmt.Errorf("list keys of %s: %w", accountID, err)
		}
		if !exists {
			return nil, fmt.Errorf("%w: no account %q", edge.ErrNotFound, accountID)
		}
	}
	return out, nil
}

func audit(ctx context.Context, tx pgx.Tx, action string, k edge.NewKey, info edge.AuditInfo, keyID, prefix string) error {
	_, err := tx.Exec(ctx, `INSERT INTO audit_log (actor, action, account_id, key_id, key_prefix, remote_addr, reason)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`,
		info.Actor, action, k.AccountID, keyID, prefix, info.RemoteAddr, info.Reason)
	if err != nil {
		return fmt.Errorf("write audit row: %w", err)
	}
	return nil
}

func insertKey(ctx context.Context, tx pgx.Tx, nk edge.NewKey) error {
	scopes := nk.Scopes
	if scopes == nil {
		scopes = []string{}
	}
	var rolled *string
	if nk.RolledFrom != "" {
		rolled = &nk.RolledFrom
	}
	var idem *string
	var reqHash []byte
	if nk.IdempotencyKey != "" {
		idem, reqHash = &nk.IdempotencyKey, nk.RequestHash
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name, expires_at, rolled_from, created_by,
			idempotency_key, request_hash)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`,
		nk.ID, nk.AccountID, string(nk.Parsed.Environment), string(nk.Parsed.Kind),
		nk.Parsed.DisplayPrefix, nk.Parsed.Hash[:], scopes, nk.Name, nk.ExpiresAt, rolled, nk.Audit.Actor,
		idem, reqHash)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23503" {
		return fmt.Errorf("%w: no account %q", edge.ErrNotFound, nk.AccountID)
	}
	if errors.As(err, &pe) && pe.Code == "23505" && pe.ConstraintName == "api_keys_idempotency" {
		return errIdempotencyKeyTaken
	}
	if errors.As(err, &pe) && pe.Code == "23505" {
		return fmt.Errorf("%w: key %s exists", edge.ErrConflict, nk.ID)
	}
	if err != nil {
		return fmt.Errorf("create key %s: %w", nk.ID, err)
	}
	return nil
}

// errIdempotencyKeyTaken is insertKey's error when the account has a key
// made with nk's idempotency key.
var errIdempotencyKeyTaken = errors.New("idempotency key taken")

// CreateKey stores the hash of a new key and its audit row. The account
// and its environment must exist. A create whose idempotency key the
// account used before stores nothing and returns an *edge.IdempotentReplay:
// the unique index decides, so of two such creates at once exactly one
// makes a key.
func (s *KeyStore) CreateKey(ctx context.Context, nk edge.NewKey) error {
	if nk.Audit.Actor == "" {
		nk.Audit.Actor = "system"
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if err := insertKey(ctx, tx, nk); err != nil {
			return err
		}
		return audit(ctx, tx, edge.ActionKeyCreated, nk, nk.Audit, nk.ID, nk.Parsed.DisplayPrefix)
	})
	if !errors.Is(err, errIdempotencyKeyTaken) {
		return err
	}
	prior, err := s.IdempotentKey(ctx, nk.AccountID, nk.IdempotencyKey)
	if err != nil {
		return err
	}
	if prior == nil {
		// Gone between the refused insert and the read: keys are never
		// deleted, so only by hand.
		return fmt.Errorf("%w: the key made with this idempotency key was removed; try again", edge.ErrConflict)
	}
	return prior
}

// IdempotentKey is the key the account made with idempotencyKey, or nil.
func (s *KeyStore) IdempotentKey(ctx context.Context, accountID, idempotencyKey string) (*edge.IdempotentReplay, error) {
	var r edge.IdempotentReplay
	err := s.pool.QueryRow(ctx, `SELECT id, request_hash FROM api_keys WHERE account_id = $1 AND idempotency_key = $2`,
		accountID, idempotencyKey).Scan(&r.KeyID, &r.RequestHash)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find the key made with this idempotency key: %w", err)
	}
	return &r, nil
}

// RollKey creates nk and makes the old key expire at oldExpiresAt (or its
// own earlier expiry), in one transaction with both audit rows.
func (s *KeyStore) RollKey(ctx context.Context, oldID string, nk edge.NewKey, now, oldExpiresAt time.Time, endNow bool) (edge.Key, error) {
	var old edge.Key
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// The row is locked first, so that a concurrent roll or revoke of
		// the same key waits, and everything below is decided on what it
		// left: a roll that lost a race is told why, as one that came
		// after would be.
		var err error
		old, err = scanKey(tx.QueryRow(ctx, `SELECT `+keyColumns+` FROM api_keys k WHERE k.id = $1 FOR UPDATE`, oldID))
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: no key %q", edge.ErrNotFound, oldID)
		}
		if err != nil {
			return fmt.Errorf("roll key %s: %w", oldID, err)
		}
		// A key is rolled once (api_keys_rolled_from_once).
		var by string
		var byRevoked bool
		switch err := tx.QueryRow(ctx, `SELECT id, revoked_at IS NOT NULL FROM api_keys WHERE rolled_from = $1`, oldID).Scan(&by, &byRevoked); {
		case err == nil && byRevoked:
			return fmt.Errorf("%w: key %s was already rolled, and its replacement %s has been revoked; create a new key instead", edge.ErrConflict, oldID, by)
		case err == nil:
			return fmt.Errorf("%w: key %s was already rolled (its replacement is %s); roll the replacement instead", edge.ErrConflict, oldID, by)
		case !errors.Is(err, pgx.ErrNoRows):
			return fmt.Errorf("roll key %s: %w", oldID, err)
		}
		if err := old.Usable(now); err != nil {
			return fmt.Errorf("%w: key %s cannot be rolled: %v", edge.ErrConflict, oldID, err)
		}
		old, err = scanKey(tx.QueryRow(ctx, `
			UPDATE api_keys k SET expires_at = LEAST(coalesce(k.expires_at, $2), $2),
				revoked_at = CASE WHEN $3 THEN $2 END
			WHERE k.id = $1
			RETURNING `+keyColumns, oldID, oldExpiresAt, endNow))
		if err != nil {
			return fmt.Errorf("roll key %s: %w", oldID, err)
		}
		if err := insertKey(ctx, tx, nk); err != nil {
			return err
		}
		info := nk.Audit
		if err := audit(ctx, tx, edge.ActionKeyRolled, nk, info, old.ID, old.DisplayPrefix); err != nil {
			return err
		}
		info.Reason = "replaces " + old.ID
		return audit(ctx, tx, edge.ActionKeyCreated, nk, info, nk.ID, nk.Parsed.DisplayPrefix)
	})
	return old, err
}

// RevokeKey revokes a key at once. Revoking a revoked key keeps the first
// revocation time.
func (s *KeyStore) RevokeKey(ctx context.Context, id string, at time.Time, info edge.AuditInfo) (edge.Key, error) {
	var k edge.Key
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// Whether it was revoked already, under the row's lock: only the
		// revocation that happens is audited (before, each repeat wrote a
		// key.revoked row with its own time and reason, for a revocation
		// that kept the first one's).
		var already bool
		err := tx.QueryRow(ctx, `SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1 FOR UPDATE`, id).Scan(&already)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: no key %q", edge.ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("revoke key %s: %w", id, err)
		}
		k, err = scanKey(tx.QueryRow(ctx, `
			UPDATE api_keys k SET revoked_at = coalesce(k.revoked_at, $2) WHERE k.id = $1
			RETURNING `+keyColumns, id, at))
		if err != nil {
			return fmt.Errorf("revoke key %s: %w", id, err)
		}
		if already {
			return nil
		}
		return audit(ctx, tx, edge.ActionKeyRevoked, edge.NewKey{AccountID: k.AccountID}, info, k.ID, k.DisplayPrefix)
	})
	return k, err
}

// PutAccount creates or updates the account (edge.AdminStore). A zone
// change is recorded by a trigger (migration 00120), which the aggregator
// re-rolls the account's rollups on, and announced to every edge (00100).
func (s *KeyStore) PutAccount(ctx context.Context, id string, name, timezone *string) (edge.Account, error) {
	var a edge.Account
	err := s.pool.QueryRow(ctx, `
		WITH a AS (
			INSERT INTO accounts (id, name, timezone) VALUES ($1, COALESCE($2, $1), COALESCE($3, 'UTC'))
			ON CONFLICT (id) DO UPDATE SET name = COALESCE($2, accounts.name), timezone = COALESCE($3, accounts.timezone)
			RETURNING id, name, timezone
		), e AS (
			INSERT INTO environments (account_id, mode) VALUES ($1, 'live'), ($1, 'test') ON CONFLICT DO NOTHING
		)
		SELECT id, name, timezone FROM a`, id, name, timezone).Scan(&a.ID, &a.Name, &a.TimeZone)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23514" {
		return a, fmt.Errorf("%w: account id %q: letters, digits and _ . : - only, at most 64", edge.ErrInvalid, id)
	}
	if err != nil {
		return a, fmt.Errorf("put account %s: %w", id, err)
	}
	return a, nil
}

// EnsureAccount creates the account and both its environments if missing.
func (s *KeyStore) EnsureAccount(ctx context.Context, id, name string) error {
	_, err := s.pool.Exec(ctx, `
		WITH a AS (INSERT INTO accounts (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING)
		INSERT INTO environments (account_id, mode) VALUES ($1, 'live'), ($1, 'test')
		ON CONFLICT DO NOTHING`, id, name)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23514" {
		return fmt.Errorf("%w: account id %q: letters, digits and _ . : - only, at most 64", edge.ErrInvalid, id)
	}
	if err != nil {
		return fmt.Errorf("ensure account %s: %w", id, err)
	}
	return nil
}

// EnsureSubscription subscribes the account to the newest version of
// planID, starting now, unless a subscription is already in force. Demos and
// tests use it to put accounts on a tier; billing owns subscriptions
// otherwise.
func (s *KeyStore) EnsureSubscription(ctx context.Context, accountID, planID string) error {
	tag, err := s.pool.Exec(ctx, `
		INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at)
		SELECT 'sub_' || md5(random()::text || clock_timestamp()::text), $1, id, version, now()
		FROM plans WHERE id = $2
		  AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE account_id = $1 AND starts_at <= now()
		                  AND (ends_at IS NULL OR ends_at > now()))
		ORDER BY version DESC LIMIT 1`, accountID, planID)
	if err != nil {
		return fmt.Errorf("subscribe %s to %s: %w", accountID, planID, err)
	}
	if tag.RowsAffected() == 0 {
		var exists bool
		if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM plans WHERE id = $1)`, planID).Scan(&exists); err != nil {
			return fmt.Errorf("subscribe %s to %s: %w", accountID, planID, err)
		}
		if !exists {
			return fmt.Errorf("%w: no plan %q", edge.ErrNotFound, planID)
		}
	}
	return nil
}
