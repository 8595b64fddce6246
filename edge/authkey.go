package edge

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// keyLookup finds a key by the hash of its secret; the key it returns is
// read-only.
type keyLookup interface {
	lookupKey(ctx context.Context, hash [32]byte) (*Key, error)
}

// errKeyStore answers a call whose key could not be checked because the
// store could not be read: not the caller's failure, so not audited.
var errKeyStore = RetryShortly(NewAPIError(http.StatusServiceUnavailable, TypeAPI, "key_store_unavailable",
	"API keys cannot be checked right now; retry shortly."))

// authenticate checks raw, the key a request presented, as every service
// that takes API keys does. A refusal comes with the audit log's reason and
// the display prefix it may keep (k is set for an expired or revoked key);
// a store that cannot be read gives errKeyStore and no reason, with the
// store's error as cause.
func authenticate(ctx context.Context, l keyLookup, raw string, now time.Time) (k *Key, reason, prefix string, cause, err error) {
	if raw == "" {
		return nil, "missing", "", nil, ErrNoKey
	}
	pk, err := ParseKey(raw)
	if err != nil {
		return nil, "malformed", safePrefix(raw), nil, err
	}
	k, err = l.lookupKey(ctx, pk.Hash)
	if errors.Is(err, ErrKeyNotFound) {
		return nil, "unknown", pk.DisplayPrefix, nil, err
	}
	if err != nil {
		return nil, "", "", err, errKeyStore
	}
	if !HashEqual(k.Hash, pk.Hash[:]) {
		return nil, "unknown", pk.DisplayPrefix, nil, ErrKeyNotFound
	}
	if err := k.Usable(now); err != nil {
		reason := "expired"
		if errors.Is(err, ErrKeyRevoked) {
			reason = "revoked"
		}
		return k, reason, k.DisplayPrefix, nil, err
	}
	return k, "", "", nil, nil
}

// DefaultKeyLookupTimeout bounds one lookup of a key in the store (the
// edge's edge.key_lookup_timeout; the usage and invoice APIs use it as it
// is). A Postgres gone silent (a failover, a dead host: no close, no
// reset) would otherwise hold the call, its goroutine and a pooled
// connection until TCP gives up, minutes later, and every call behind them
// once the pool is taken; bounded, the call gets 503 key_store_unavailable.
// One that is merely slow (a migration's lock on api_keys) gets it too once
// the bound has passed.
const DefaultKeyLookupTimeout = 5 * time.Second

// lookupBounded looks hash up in store within d.
func lookupBounded(ctx context.Context, store KeyStore, hash [32]byte, d time.Duration) (Key, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return store.KeyByHash(ctx, hash)
}

// storeLookup looks keys up in a KeyStore.
type storeLookup struct{ KeyStore }

func (s storeLookup) lookupKey(ctx context.Context, hash [32]byte) (*Key, error) {
	k, err := lookupBounded(ctx, s.KeyStore, hash, DefaultKeyLookupTimeout)
	if err != nil {
		return nil, err
	}
	return &k, nil
}

// AuthenticateKey checks an API key as the edge does, for the other
// services that take one (the usage and invoice APIs): raw is what Bearer
// found in the request. Its errors are the edge's (401 missing, malformed,
// unknown, expired or revoked; 503 when the store cannot be read), and every
// failed authentication is recorded to auditor, when there is one, as the
// edge records its own, with actor saying which service refused it.
func AuthenticateKey(ctx context.Context, keys KeyStore, raw string, now time.Time, auditor Auditor, actor, remoteAddr string) (Key, error) {
	k, reason, prefix, _, err := authenticate(ctx, storeLookup{keys}, raw, now)
	if err == nil {
		return *k, nil
	}
	if reason != "" && auditor != nil {
		ev := AuditEvent{At: now, Actor: actor, Action: ActionAuthFailed, KeyPrefix: prefix,
			RemoteAddr: hostOnly(remoteAddr), Reason: reason, Count: 1}
		if k != nil {
			ev.AccountID, ev.KeyID = k.AccountID, k.ID
		}
		auditor.Record(ev)
	}
	return Key{}, err
}
