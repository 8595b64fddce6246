package edge

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// AuthenticateKey checks an API key as the edge does, for the other
// services that take one (the usage and invoice APIs): raw is what Bearer
// found in the request. Its errors are the edge's (401 missing, malformed,
// unknown, expired or revoked; 503 when the store cannot be read), and every
// failed authentication is recorded to auditor, when there is one, as the
// edge records its own, with actor saying which service refused it.
func AuthenticateKey(ctx context.Context, keys KeyStore, raw string, now time.Time, auditor Auditor, actor, remoteAddr string) (Key, error) {
	failed := func(reason, prefix string, k *Key, err error) (Key, error) {
		if auditor != nil {
			ev := AuditEvent{At: now, Actor: actor, Action: ActionAuthFailed, KeyPrefix: prefix,
				RemoteAddr: hostOnly(remoteAddr), Reason: reason, Count: 1}
			if k != nil {
				ev.AccountID, ev.KeyID = k.AccountID, k.ID
			}
			auditor.Record(ev)
		}
		return Key{}, err
	}
	if raw == "" {
		return failed("missing", "", nil, ErrNoKey)
	}
	pk, err := ParseKey(raw)
	if err != nil {
		return failed("malformed", safePrefix(raw), nil, err)
	}
	k, err := keys.KeyByHash(ctx, pk.Hash)
	if errors.Is(err, ErrKeyNotFound) {
		return failed("unknown", pk.DisplayPrefix, nil, err)
	}
	if err != nil {
		return Key{}, NewAPIError(http.StatusServiceUnavailable, TypeAPI, "key_store_unavailable",
			"API keys cannot be checked right now; retry shortly.")
	}
	if !HashEqual(k.Hash, pk.Hash[:]) {
		return failed("unknown", pk.DisplayPrefix, nil, ErrKeyNotFound)
	}
	if err := k.Usable(now); err != nil {
		reason := "expired"
		if errors.Is(err, ErrKeyRevoked) {
			reason = "revoked"
		}
		return failed(reason, k.DisplayPrefix, &k, err)
	}
	return k, nil
}
