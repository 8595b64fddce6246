// Package postgres stores the edge's API keys in Postgres.
package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/schemas"
)

// KeyStore reads and writes api_keys.
type KeyStore struct {
	pool *pgxpool.Pool
}

var _ edge.KeyStore = (*KeyStore)(nil)

// NewKeyStore returns a KeyStore over pool.
func NewKeyStore(pool *pgxpool.Pool) *KeyStore { return &KeyStore{pool: pool} }

// KeyByHash finds the key whose secret hashes to hash.
func (s *KeyStore) KeyByHash(ctx context.Context, hash [32]byte) (edge.Key, error) {
	var k edge.Key
	var env, kind string
	err := s.pool.QueryRow(ctx, `
		SELECT id, account_id, environment, kind, display_prefix, hash, scopes, expires_at, revoked_at
		FROM api_keys WHERE hash = $1`, hash[:]).
		Scan(&k.ID, &k.AccountID, &env, &kind, &k.DisplayPrefix, &k.Hash, &k.Scopes, &k.ExpiresAt, &k.RevokedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return edge.Key{}, edge.ErrKeyNotFound
	}
	if err != nil {
		return edge.Key{}, fmt.Errorf("look up key: %w", err)
	}
	k.Environment, k.Kind = schemas.Environment(env), edge.KeyKind(kind)
	return k, nil
}

// NewKey is what CreateKey needs to store a key.
type NewKey struct {
	ID        string
	AccountID string
	Name      string
	Parsed    edge.ParsedKey
	Scopes    []string
}

// CreateKey stores the hash of a new key. The account and its environment
// must exist.
func (s *KeyStore) CreateKey(ctx context.Context, nk NewKey) error {
	scopes := nk.Scopes
	if scopes == nil {
		scopes = []string{}
	}
	_, err := s.pool.Exec(ctx, `
		INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
		nk.ID, nk.AccountID, string(nk.Parsed.Environment), string(nk.Parsed.Kind),
		nk.Parsed.DisplayPrefix, nk.Parsed.Hash[:], scopes, nk.Name)
	if err != nil {
		return fmt.Errorf("create key %s: %w", nk.ID, err)
	}
	return nil
}

// EnsureAccount creates the account and both its environments if missing.
func (s *KeyStore) EnsureAccount(ctx context.Context, id, name string) error {
	_, err := s.pool.Exec(ctx, `
		WITH a AS (INSERT INTO accounts (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING)
		INSERT INTO environments (account_id, mode) VALUES ($1, 'live'), ($1, 'test')
		ON CONFLICT DO NOTHING`, id, name)
	if err != nil {
		return fmt.Errorf("ensure account %s: %w", id, err)
	}
	return nil
}
