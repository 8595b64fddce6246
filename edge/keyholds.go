package edge

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Most calls are decided once, at admission, and end soon after. An
// upgraded connection (a WebSocket), a long streamed answer (an event
// stream) or a long upload outlives its admission by minutes or hours, and
// its key must not: a hold ends such a call once its key is no
// longer usable, at the key's expiry, or when a change notification names
// the key (or its account, or everything) and a fresh look-up finds it
// revoked, expired or gone. Before, a tunnel opened with a key that was
// then revoked carried traffic for as long as the caller kept it busy.

// LongAnswerBytes is the length past which an answer is held under its
// key while it streams, as a tunnel is: an answer of unknown length (an
// event stream, a chunked download) or a longer one can outlive its
// admission by as long as the upstream keeps sending. Shorter ones take no
// hold, so that ordinary calls pay nothing for it.
const LongAnswerBytes = 1 << 20

// HoldsAnswer reports whether an answer whose head gives contentLength (a
// negative one: not given) is held under its key while it streams.
func HoldsAnswer(contentLength int64) bool {
	return contentLength < 0 || contentLength > LongAnswerBytes
}

// HoldsUpload reports whether a call whose request body has
// contentLength (negative: streamed with no length given) is held under
// its key from its admission until its answer begins (the fasthttp front)
// or ends (the net/http handler), by the rule
// HoldsAnswer applies to answers: a streamed or long upload goes on for as
// long as its caller keeps sending, and the wait for the answer after it
// for as long as the upstream takes. A body that is not given
// (contentLength 0) or is short takes no hold.
func HoldsUpload(contentLength int64) bool {
	return HoldsAnswer(contentLength)
}

// ErrKeyEnded ends a held call whose key is no longer usable.
var ErrKeyEnded = errors.New("the call's API key is no longer usable")

// keyHold is one call held open under a key.
type keyHold struct {
	key   *Key
	end   func()
	timer *time.Timer // at the key's expiry, when it has one
	done  bool
}

// keyHolds are the holds of one KeyCache.
type keyHolds struct {
	mu    sync.Mutex
	holds map[*keyHold]struct{}
	// watching is set while a goroutine re-checks every hold each
	// untrustedRecheck (watchUntrusted).
	watching atomic.Bool
}

// recheckTimeout bounds the fresh look-up of a held key.
const recheckTimeout = 10 * time.Second

// untrustedRecheck is how often every held call's key is looked up afresh
// while the cache is untrusted: no notification would name a key revoked
// then, so the calls held under it are checked as often as a revocation
// must take effect (within a second).
const untrustedRecheck = 500 * time.Millisecond

// Epoch counts the invalidations the cache has had. Read it before a key
// is looked up and give it to Hold: an invalidation between the two is
// then checked at once.
func (c *KeyCache) Epoch() uint64 { return c.epoch.Load() }

// Hold calls end, once, when k stops being usable (see keyHold), and
// returns a release that forgets the hold; call it when the held call
// ends. epoch is Epoch as read before k was looked up.
func (c *KeyCache) Hold(k *Key, epoch uint64, end func()) (release func()) {
	h := &keyHold{key: k, end: end}
	c.holds.mu.Lock()
	if c.holds.holds == nil {
		c.holds.holds = map[*keyHold]struct{}{}
	}
	c.holds.holds[h] = struct{}{}
	c.expireAt(h, k.ExpiresAt)
	c.holds.mu.Unlock()
	if !c.trusted.Load() {
		c.watchUntrusted()
	}
	if c.epoch.Load() != epoch {
		// The key may have changed after it was looked up, before the hold
		// was there for the notification to find.
		go c.recheck([]*keyHold{h})
	}
	return func() {
		c.holds.mu.Lock()
		defer c.holds.mu.Unlock()
		c.forget(h)
	}
}

// expireAt ends h at at (none: never by time). Holds' lock held.
func (c *KeyCache) expireAt(h *keyHold, at *time.Time) {
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
	if at != nil {
		h.timer = time.AfterFunc(at.Sub(c.now()), func() { c.endHold(h) })
	}
}

// forget drops h without ending it. Holds' lock held.
func (c *KeyCache) forget(h *keyHold) {
	h.done = true
	if h.timer != nil {
		h.timer.Stop()
	}
	delete(c.holds.holds, h)
}

// endHold ends h's call, unless it ended or was released already.
func (c *KeyCache) endHold(h *keyHold) {
	c.holds.mu.Lock()
	if h.done {
		c.holds.mu.Unlock()
		return
	}
	c.forget(h)
	c.holds.mu.Unlock()
	h.end()
}

// heldFor returns the holds an invalidation names.
func (c *KeyCache) heldFor(inv Invalidation) []*keyHold {
	c.holds.mu.Lock()
	defer c.holds.mu.Unlock()
	var out []*keyHold
	for h := range c.holds.holds {
		switch {
		case inv.All,
			inv.AccountID != "" && h.key.AccountID == inv.AccountID,
			len(inv.KeyHash) == 32 && bytes.Equal(h.key.Hash, inv.KeyHash):
			out = append(out, h)
		}
	}
	return out
}

// watchUntrusted re-checks every held call each untrustedRecheck while
// the cache is untrusted (its listener is down, so a revocation would
// reach no hold) and calls are held; one goroutine at a time.
func (c *KeyCache) watchUntrusted() {
	if !c.holds.watching.CompareAndSwap(false, true) {
		return
	}
	go func() {
		for {
			time.Sleep(untrustedRecheck)
			if hs := c.heldFor(Invalidation{All: true}); !c.trusted.Load() && len(hs) > 0 {
				c.recheck(hs)
				continue
			}
			c.holds.watching.Store(false)
			// A hold taken, or trust lost, just before that store found
			// the flag still set: look again.
			c.holds.mu.Lock()
			more := len(c.holds.holds) > 0
			c.holds.mu.Unlock()
			if c.trusted.Load() || !more || !c.holds.watching.CompareAndSwap(false, true) {
				return
			}
		}
	}()
}

// recheck looks each held key up afresh, from the store: one revoked,
// expired or gone ends its call; one still usable keeps it, with its
// expiry as it now is (a roll brings it forward). A look-up that fails
// ends the call too, as a new call is refused while the store cannot
// answer (fail closed): kept, a call under a key revoked meanwhile would
// go on, since no second notification for that key may ever come.
func (c *KeyCache) recheck(hs []*keyHold) {
	// One look-up per key, however many calls it holds open.
	type answer struct {
		k   Key
		err error
	}
	seen := map[[32]byte]answer{}
	for _, h := range hs {
		if len(h.key.Hash) != 32 {
			continue
		}
		a, ok := seen[[32]byte(h.key.Hash)]
		if !ok {
			ctx, cancel := context.WithTimeout(context.Background(), recheckTimeout)
			a.k, a.err = c.store.KeyByHash(ctx, [32]byte(h.key.Hash))
			cancel()
			seen[[32]byte(h.key.Hash)] = a
		}
		k, err := a.k, a.err
		switch {
		case err != nil: // ErrKeyNotFound, or no answer
			c.endHold(h)
		case k.Usable(c.now()) != nil:
			c.endHold(h)
		default:
			c.holds.mu.Lock()
			if !h.done {
				c.expireAt(h, k.ExpiresAt)
			}
			c.holds.mu.Unlock()
		}
	}
}
