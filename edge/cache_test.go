package edge

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// mapStore answers from one known key and counts its lookups.
type mapStore struct {
	known   [32]byte
	lookups atomic.Int64
}

func (s *mapStore) KeyByHash(_ context.Context, h [32]byte) (Key, error) {
	s.lookups.Add(1)
	if h == s.known {
		return Key{ID: "key_real", AccountID: "acct_real"}, nil
	}
	return Key{}, ErrKeyNotFound
}

// Well-formed made-up keys, more than the whole cache holds, fill the
// unknown entries' budget again and again; the real key stays cached.
// (Before, the whole cache was emptied when it was full.)
func TestAFloodOfUnknownKeysDoesNotEvictTheKnownOnes(t *testing.T) {
	store := &mapStore{known: sha256.Sum256([]byte("sk_live_real"))}
	c := NewKeyCache(store, time.Hour)
	c.SetTrusted(true)
	ctx := context.Background()
	if _, err := c.KeyByHash(ctx, store.known); err != nil {
		t.Fatal(err)
	}
	for i := range maxCacheEntries + maxUnknownEntries { // past the whole cache's bound

		if _, err := c.KeyByHash(ctx, sha256.Sum256([]byte(fmt.Sprint("made-up-", i)))); err != ErrKeyNotFound {
			t.Fatalf("made-up key %d: %v", i, err)
		}
	}
	before := store.lookups.Load()
	if _, err := c.KeyByHash(ctx, store.known); err != nil {
		t.Fatal(err)
	}
	if store.lookups.Load() != before {
		t.Error("the real key was looked up again: the flood evicted it")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.unknown > c.maxUnknown || c.entries != c.unknown+1 {
		t.Errorf("%d entries, %d of them unknown (budget %d), want the real key plus at most the budget", c.entries, c.unknown, c.maxUnknown)
	}
}

// revocableStore answers one key, revoked once revoked is set.
type revocableStore struct {
	hash    [32]byte
	revoked atomic.Bool
	// down fails every look-up.
	down    atomic.Bool
	lookups atomic.Int64
}

func (s *revocableStore) KeyByHash(_ context.Context, h [32]byte) (Key, error) {
	s.lookups.Add(1)
	if s.down.Load() {
		return Key{}, errors.New("key store unreachable")
	}
	if h != s.hash {
		return Key{}, ErrKeyNotFound
	}
	k := Key{ID: "key_held", AccountID: "acct_held", Hash: s.hash[:]}
	if s.revoked.Load() {
		at := time.Now()
		k.RevokedAt = &at
	}
	return k, nil
}

// A key revoked after the call's look-up but before its hold was taken
// ends the call all the same: the notification came while there was no
// hold for it to find, and the hold sees the epoch moved.
func TestAHoldTakenAfterARevocationItMissedEndsItsCall(t *testing.T) {
	store := &revocableStore{hash: sha256.Sum256([]byte("sk_live_held"))}
	c := NewKeyCache(store, time.Hour)
	c.SetTrusted(true)
	ctx := context.Background()

	epoch := c.Epoch()
	k, err := c.KeyByHash(ctx, store.hash)
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	quiet := c.Hold(&k, epoch, func() { close(ended) }) // no change since the look-up
	select {
	case <-ended:
		t.Fatal("a hold on a usable key ended its call")
	case <-time.After(200 * time.Millisecond):
	}
	quiet()

	epoch = c.Epoch()
	k, err = c.KeyByHash(ctx, store.hash)
	if err != nil {
		t.Fatal(err)
	}
	store.revoked.Store(true)
	c.Invalidate(Invalidation{KeyHash: store.hash[:]}) // before the hold
	ended = make(chan struct{})
	release := c.Hold(&k, epoch, func() { close(ended) })
	defer release()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("a hold taken after a revocation it missed kept its call open")
	}
}

// heldCall looks the store's key up and holds a call under it, returning
// a channel closed when the hold ends the call.
func heldCall(t *testing.T, c *KeyCache, store *revocableStore) <-chan struct{} {
	t.Helper()
	epoch := c.Epoch()
	k, err := c.KeyByHash(context.Background(), store.hash)
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	t.Cleanup(c.Hold(&k, epoch, func() { close(ended) }))
	return ended
}

// A change notification names a held key, and its fresh look-up fails:
// the call ends (fail closed), as a new call under the key would be
// refused. Kept, as it was, a call under a key revoked while the store
// could not answer went on, since no second notification need come.
func TestAHeldCallWhoseKeyCannotBeCheckedEnds(t *testing.T) {
	store := &revocableStore{hash: sha256.Sum256([]byte("sk_live_unchecked"))}
	c := NewKeyCache(store, time.Hour)
	c.SetTrusted(true)
	ended := heldCall(t, c, store)
	store.down.Store(true)
	c.Invalidate(Invalidation{KeyHash: store.hash[:]})
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("a held call whose key could not be looked up again was kept open")
	}
}

// While the cache is untrusted (the change listener is down), no
// notification reaches the holds, so every held call's key is looked up
// afresh each half second: a key revoked then ends its call within about
// a second. A key still usable keeps its call.
func TestHeldCallsAreRecheckedWhileTheCacheIsUntrusted(t *testing.T) {
	store := &revocableStore{hash: sha256.Sum256([]byte("sk_live_untrusted"))}
	c := NewKeyCache(store, time.Hour)
	c.SetTrusted(true)
	ended := heldCall(t, c, store)
	_ = heldCall(t, c, store) // a second call under the same key
	c.SetTrusted(false)
	before := store.lookups.Load()
	select {
	case <-ended:
		t.Fatal("a held call under a usable key ended when the cache became untrusted")
	case <-time.After(3*untrustedRecheck + untrustedRecheck/2):
	}
	// The re-check that losing trust starts, and three rounds at most in
	// that time: one look-up each for the key both calls share.
	if n := store.lookups.Load() - before; n < 1 || n > 4 {
		t.Errorf("%d look-ups in four re-checks of two calls under one key, want one a re-check", n)
	}
	store.revoked.Store(true) // revoked with no notification: the listener is down
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("a call held under a key revoked while the cache was untrusted was kept open")
	}
}

// racingStore answers one key, and runs during (the first look-up after
// hook is set) what happens while that look-up is in flight.
type racingStore struct {
	revocableStore
	during atomic.Pointer[func()]
}

func (s *racingStore) KeyByHash(ctx context.Context, h [32]byte) (Key, error) {
	k, err := s.revocableStore.KeyByHash(ctx, h)
	if f := s.during.Swap(nil); f != nil {
		(*f)()
	}
	return k, err
}

// A key revoked, and its revocation notified, while a look-up of it was in
// flight (the look-up had read the key before the revocation committed) is
// not served to that call: it is looked up again. Before, that one call
// went through under the revoked key.
func TestALookupOvertakenByARevocationIsNotServed(t *testing.T) {
	store := &racingStore{revocableStore: revocableStore{hash: sha256.Sum256([]byte("sk_live_raced"))}}
	c := NewKeyCache(store, time.Hour)
	c.SetTrusted(true)
	revoke := func() {
		store.revoked.Store(true)
		c.Invalidate(Invalidation{KeyHash: store.hash[:]})
	}
	store.during.Store(&revoke)
	k, err := c.KeyByHash(context.Background(), store.hash)
	if err != nil {
		t.Fatal(err)
	}
	if k.RevokedAt == nil {
		t.Fatal("a key revoked while its look-up was in flight was served as active")
	}
	if n := store.lookups.Load(); n != 2 {
		t.Errorf("%d look-ups, want 2 (the one overtaken, and one after the change)", n)
	}
}

// goneStore answers its key until gone is set, then knows it no more.
type goneStore struct {
	hash [32]byte
	gone atomic.Bool
}

func (s *goneStore) KeyByHash(_ context.Context, h [32]byte) (Key, error) {
	if h != s.hash || s.gone.Load() {
		return Key{}, ErrKeyNotFound
	}
	return Key{ID: "key_gone", AccountID: "acct_gone"}, nil
}

// A key deleted since it was cached comes back as unknown while still
// listed under its account; invalidating the account drops it, and the
// count of unknown entries with it (it drifted up before, so unknown keys
// were dropped before their budget was reached).
func TestInvalidatingAnAccountCountsItsUnknownEntries(t *testing.T) {
	store := &goneStore{hash: sha256.Sum256([]byte("sk_live_gone"))}
	now := time.Now()
	c := NewKeyCache(store, time.Minute)
	c.now = func() time.Time { return now }
	c.SetTrusted(true)
	ctx := context.Background()
	if _, err := c.KeyByHash(ctx, store.hash); err != nil {
		t.Fatal(err)
	}
	store.gone.Store(true)
	now = now.Add(2 * time.Minute) // past the entry's TTL
	if _, err := c.KeyByHash(ctx, store.hash); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("the deleted key: %v, want not found", err)
	}
	c.Invalidate(Invalidation{AccountID: "acct_gone"})
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries != 0 || c.unknown != 0 {
		t.Fatalf("after invalidating the account: %d entries, %d unknown; want 0 and 0", c.entries, c.unknown)
	}
}
