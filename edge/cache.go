package edge

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// KeyCache keeps looked-up keys (and unknown hashes) in process so that a
// call costs no database round trip. It is only trusted while the change
// notification channel is connected: a notification drops the entry at
// once, the TTL is a safety net, and while the channel is down every lookup
// goes to the store, so a revoked key is never served from a stale copy.
// A plan change that comes with time (a subscription ending, or one
// scheduled to start) sends no notification: an entry is looked up again
// when its key's plan is due to change (Key.PlanChangesIn).
type KeyCache struct {
	store KeyStore
	ttl   time.Duration
	now   func() time.Time

	trusted atomic.Bool
	// epoch counts invalidations; a lookup that raced one is not cached.
	epoch atomic.Uint64

	// byHash is read without a lock on every call ([32]byte → *cacheEntry);
	// mu orders its writes with byAccount's and the epoch.
	byHash    sync.Map
	entries   int
	mu        sync.Mutex
	byAccount map[string]map[[32]byte]struct{}
	// unknown counts the entries for hashes no key has. Anyone can make
	// well-formed keys (the checksum is public), so their entries have a
	// budget of their own, maxUnknown: when it is spent they alone are
	// dropped, and a flood of made-up keys cannot empty the cache of the
	// real ones.
	unknown, maxUnknown int
	// lookupTimeout bounds one lookup in the store.
	lookupTimeout time.Duration

	// holds are the calls held open under a key (keyholds.go).
	holds keyHolds
}

// cacheEntry's key is shared by every call that finds it, read-only.
// until is when it is looked up again: the TTL after it was cached, or
// sooner when the key's plan is due to change (Key.PlanChangesIn).
type cacheEntry struct {
	key   *Key
	err   error
	until time.Time
}

// maxCacheEntries bounds the cache's memory; maxUnknownEntries bounds the
// part of it that unknown hashes may take.
const (
	maxCacheEntries   = 200_000
	maxUnknownEntries = 50_000
)

var (
	_ KeyStore       = (*KeyCache)(nil)
	_ sharedKeyStore = (*KeyCache)(nil)
)

// keyAccount is k's account, or "" for an unknown key's entry.
func keyAccount(k *Key) string {
	if k == nil {
		return ""
	}
	return k.AccountID
}

// NewKeyCache wraps store. The cache starts untrusted: call SetTrusted(true)
// once the notification listener is connected.
func NewKeyCache(store KeyStore, ttl time.Duration) *KeyCache {
	return &KeyCache{
		store:      store,
		ttl:        ttl,
		now:        time.Now,
		byAccount:  map[string]map[[32]byte]struct{}{},
		maxUnknown: maxUnknownEntries,

		lookupTimeout: DefaultKeyLookupTimeout,
	}
}

// SetLookupTimeout sets the bound of one lookup in the store
// (edge.key_lookup_timeout); 0 keeps DefaultKeyLookupTimeout. Call it
// before the cache is used.
func (c *KeyCache) SetLookupTimeout(d time.Duration) {
	if d > 0 {
		c.lookupTimeout = d
	}
}

// KeyByHash returns the cached key or looks it up.
func (c *KeyCache) KeyByHash(ctx context.Context, hash [32]byte) (Key, error) {
	k, err := c.sharedKeyByHash(ctx, hash)
	if k == nil {
		return Key{}, err
	}
	return *k, err
}

// sharedKeyByHash is KeyByHash without the copy: the key it returns may be
// the cache's own, and must not be changed.
func (c *KeyCache) sharedKeyByHash(ctx context.Context, hash [32]byte) (*Key, error) {
	trusted := c.trusted.Load()
	if trusted {
		if v, ok := c.byHash.Load(hash); ok {
			if e := v.(*cacheEntry); c.now().Before(e.until) {
				return e.key, e.err
			}
		}
	}
	epoch := c.epoch.Load()
	asked := c.now() // PlanChangesIn counts from the store's answer, after this
	found, err := lookupBounded(ctx, c.store, hash, c.lookupTimeout)
	if err == nil && c.epoch.Load() != epoch {
		// A change was notified while the look-up ran: it may be this
		// key's revocation, committed after the look-up read the key.
		// The answer is not cached (below), and it is not served either:
		// the key is looked up once more, after the change. (Served, one
		// call went through under a key revoked before its answer came.)
		epoch = c.epoch.Load()
		asked = c.now()
		found, err = lookupBounded(ctx, c.store, hash, c.lookupTimeout)
	}
	if err != nil && !errors.Is(err, ErrKeyNotFound) {
		return nil, err
	}
	var k *Key
	if err == nil {
		k = &found
	}
	if trusted && c.trusted.Load() {
		c.mu.Lock()
		if c.epoch.Load() == epoch {
			switch {
			case k == nil && c.unknown >= c.maxUnknown:
				c.dropUnknown()
			case c.entries >= maxCacheEntries:
				c.byHash.Clear()
				clear(c.byAccount)
				c.entries, c.unknown = 0, 0
			}
			e := &cacheEntry{key: k, err: err, until: c.now().Add(c.ttl)}
			if k != nil && k.PlanChangesIn > 0 && k.PlanChangesIn < c.ttl {
				e.until = asked.Add(k.PlanChangesIn)
			}
			old, had := c.byHash.Swap(hash, e)
			switch {
			case !had:
				c.entries++
			case old.(*cacheEntry).key == nil:
				c.unknown--
			}
			if k == nil {
				c.unknown++
			}
			if err == nil {
				m := c.byAccount[k.AccountID]
				if m == nil {
					m = map[[32]byte]struct{}{}
					c.byAccount[k.AccountID] = m
				}
				m[hash] = struct{}{}
			}
		}
		c.mu.Unlock()
	}
	return k, err
}

// dropUnknown drops every entry of an unknown hash. c.mu is held.
func (c *KeyCache) dropUnknown() {
	c.byHash.Range(func(h, v any) bool {
		if v.(*cacheEntry).key == nil {
			c.byHash.Delete(h)
			c.entries--
		}
		return true
	})
	c.unknown = 0
}

// Invalidate drops what inv names, and checks again the keys of the calls
// held open (Hold) that it names.
func (c *KeyCache) Invalidate(inv Invalidation) {
	c.invalidate(inv)
	if hs := c.heldFor(inv); len(hs) > 0 {
		go c.recheck(hs)
	}
}

func (c *KeyCache) invalidate(inv Invalidation) {
	c.epoch.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case inv.All:
		c.byHash.Clear()
		clear(c.byAccount)
		c.entries, c.unknown = 0, 0
	case inv.AccountID != "":
		for h := range c.byAccount[inv.AccountID] {
			if v, had := c.byHash.LoadAndDelete(h); had {
				c.entries--
				// A key deleted since it was cached is looked up
				// again as unknown while still listed here.
				if v.(*cacheEntry).key == nil {
					c.unknown--
				}
			}
		}
		delete(c.byAccount, inv.AccountID)
	case len(inv.KeyHash) == 32:
		h := [32]byte(inv.KeyHash)
		if v, had := c.byHash.LoadAndDelete(h); had {
			c.entries--
			if v.(*cacheEntry).key == nil {
				c.unknown--
			}
			if m := c.byAccount[keyAccount(v.(*cacheEntry).key)]; m != nil {
				delete(m, h)
			}
		}
	}
}

// SetTrusted turns caching on (the listener is connected) or off (it is
// not, so changes could be missed). Either way the cache starts empty.
func (c *KeyCache) SetTrusted(ok bool) {
	c.trusted.Store(ok)
	c.Invalidate(Invalidation{All: true})
	if !ok {
		c.watchUntrusted() // until trusted again, as no change reaches the holds
	}
}

// Trusted reports whether the cache is in use.
func (c *KeyCache) Trusted() bool { return c.trusted.Load() }
