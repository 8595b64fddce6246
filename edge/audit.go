package edge

import (
	"context"
	"time"
)

// Audit actions.
const (
	ActionKeyCreated = "key.created"
	ActionKeyRolled  = "key.rolled"
	ActionKeyRevoked = "key.revoked"
	ActionAuthFailed = "auth.failed"
	ActionAdminAuth  = "admin.auth_failed"
)

// AuditEvent is one row of the audit log. It never holds a secret: at most
// a key's display prefix.
type AuditEvent struct {
	At         time.Time
	Actor      string
	Action     string
	AccountID  string
	KeyID      string
	KeyPrefix  string
	RemoteAddr string
	Reason     string
	// Count is how many identical events this row stands for (failed
	// authentications are folded per flush interval).
	Count int
}

// Auditor records failed authentications. Record must not block: an
// implementation batches and folds, so that a flood of bad keys costs the
// database a bounded number of rows.
type Auditor interface {
	Record(ev AuditEvent)
}

// AuditInfo says who asked for a key change, for the audit row written in
// the same transaction as the change.
type AuditInfo struct {
	Actor      string
	RemoteAddr string
	Reason     string
}

// NewKey is what a store needs to create a key.
type NewKey struct {
	ID        string
	AccountID string
	Name      string
	Parsed    ParsedKey
	Scopes    []string
	ExpiresAt *time.Time
	// RolledFrom is the id of the key this one replaces.
	RolledFrom string
	Audit      AuditInfo
	// IdempotencyKey, when set, is the create's Idempotency-Key, and
	// RequestHash the SHA-256 of the request it came with: an account's
	// second create with the same IdempotencyKey makes no key, and
	// CreateKey returns an *IdempotentReplay naming the first one's.
	IdempotencyKey string
	RequestHash    []byte
}

// IdempotentReplay is the key an earlier create of the account made with
// the same idempotency key (CreateKey's error, IdempotentKey's answer):
// KeyID is that key, and RequestHash the hash of the request it came with.
type IdempotentReplay struct {
	KeyID       string
	RequestHash []byte
}

func (e *IdempotentReplay) Error() string {
	return "idempotency key used before, by the create of key " + e.KeyID
}

// Account is an account as the admin API shows it.
type Account struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	TimeZone string `json:"timezone"`
}

// AdminStore is the key lifecycle the admin API drives. Every change writes
// its audit row in the same transaction.
type AdminStore interface {
	EnsureAccount(ctx context.Context, id, name string) error
	// PutAccount creates the account (and both its environments) or
	// updates it, and returns it as stored. A nil name or zone keeps the
	// stored one (a new account's name is its id, its zone UTC).
	PutAccount(ctx context.Context, id string, name, timezone *string) (Account, error)
	CreateKey(ctx context.Context, nk NewKey) error
	// IdempotentKey is the key the account made with idempotencyKey, or
	// nil when it made none.
	IdempotentKey(ctx context.Context, accountID, idempotencyKey string) (*IdempotentReplay, error)
	ListKeys(ctx context.Context, accountID string) ([]Key, error)
	GetKey(ctx context.Context, id string) (Key, error)
	// RollKey creates nk and sets the old key to expire at oldExpiresAt
	// (never later than an expiry it already has); with endNow it revokes
	// the old key instead, at oldExpiresAt, so that no edge whose clock is
	// behind serves it for the difference. It is decided with the old key
	// locked: one that is revoked, expired at now, or rolled already (to a
	// replacement not revoked since) is ErrConflict.
	RollKey(ctx context.Context, oldID string, nk NewKey, now, oldExpiresAt time.Time, endNow bool) (Key, error)
	RevokeKey(ctx context.Context, id string, at time.Time, info AuditInfo) (Key, error)
}
