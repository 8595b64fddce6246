package aggregator

import (
	"context"
	"sync"
	"time"

	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// statusTTL is how old the usage API's complete_through and its "this
// account has no too-late events" answer may be. Dashboards poll the usage
// API every few seconds per account; without the cache each poll cost
// ClickHouse two more queries (the watermarks and the late events), and
// Postgres one (the spool holds), besides the rollups themselves.
// Watermarks move once a second anyway, and an older one only understates
// completeness. (An answer up to a second old can miss a spool hold taken
// within that second, as the invoicer's gate read at that moment would.)
const statusTTL = time.Second

// maxLateEntries bounds the per-account memory of the late-event answers;
// past it the map starts over.
const maxLateEntries = 100_000

// statusCache answers the usage response's status fields from a short-lived
// memory of the store's answers.
type statusCache struct {
	store UsageStore
	holds SpoolHolds // nil: complete_through is not known
	now   func() time.Time

	mu   sync.Mutex
	wmAt time.Time
	wm   time.Time
	wmOK bool
	late map[lateKey]lateEntry

	past       PastRollups // nil: no meter is reported as backfilling
	pastAt     time.Time
	unfinished map[string]bool

	rezones  Rezones // nil: no account is reported as rezoning
	rezAt    time.Time
	rezoning map[string]bool
}

// allTime ends the "ever" range, inside ClickHouse's DateTime (to 2106).
var allTime = time.Date(2105, 1, 1, 0, 0, 0, 0, time.UTC)

type lateKey struct{ account, env string }

type lateEntry struct {
	at   time.Time
	none bool // the account environment had no too-late event at all
}

func newStatusCache(store UsageStore, holds SpoolHolds, now func() time.Time) *statusCache {
	return &statusCache{store: store, holds: holds, now: now, late: map[lateKey]lateEntry{}}
}

// CompleteThrough is the store's watermark capped by the edges' spool
// holds (schemas.HeldThrough), at most statusTTL old. Without holds to read it is
// not known.
func (c *statusCache) CompleteThrough(ctx context.Context) (time.Time, bool, error) {
	if c.holds == nil {
		return time.Time{}, false, nil
	}
	now := c.now()
	c.mu.Lock()
	if !c.wmAt.IsZero() && now.Sub(c.wmAt) < statusTTL {
		w, ok := c.wm, c.wmOK
		c.mu.Unlock()
		return w, ok, nil
	}
	c.mu.Unlock()
	w, ok, err := c.store.CompleteThrough(ctx)
	if err != nil {
		return w, ok, err
	}
	if ok {
		holds, err := c.holds.SpoolHolds(ctx)
		if err != nil {
			return time.Time{}, false, err
		}
		w = schemas.HeldThrough(w, holds)
	}
	c.mu.Lock()
	c.wmAt, c.wm, c.wmOK = now, w, ok
	c.mu.Unlock()
	return w, ok, nil
}

// Backfilling tells whether meter key's past is still being rolled up,
// from an answer at most statusTTL old.
func (c *statusCache) Backfilling(ctx context.Context, config []meter.Meter, key string) (bool, error) {
	if c.past == nil {
		return false, nil
	}
	now := c.now()
	c.mu.Lock()
	if !c.pastAt.IsZero() && now.Sub(c.pastAt) < statusTTL {
		u := c.unfinished[key]
		c.mu.Unlock()
		return u, nil
	}
	c.mu.Unlock()
	unfinished, err := c.past.Unfinished(ctx, config)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	c.pastAt, c.unfinished = now, unfinished
	c.mu.Unlock()
	return unfinished[key], nil
}

// Rezoning tells whether account's hour, day and month rollups are owed a
// re-roll onto its time zone, from an answer at most statusTTL old.
func (c *statusCache) Rezoning(ctx context.Context, account string) (bool, error) {
	if c.rezones == nil {
		return false, nil
	}
	now := c.now()
	c.mu.Lock()
	if !c.rezAt.IsZero() && now.Sub(c.rezAt) < statusTTL {
		r := c.rezoning[account]
		c.mu.Unlock()
		return r, nil
	}
	c.mu.Unlock()
	owed, err := c.rezones.Rezoning(ctx)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	c.rezAt, c.rezoning = now, owed
	c.mu.Unlock()
	return owed[account], nil
}

// TooLate is the store's count. Most accounts never have a too-late
// event: for them one count over all time, at most statusTTL old, answers
// every range without asking the store again.
func (c *statusCache) TooLate(ctx context.Context, account, env string, from, to time.Time) (uint64, error) {
	now := c.now()
	k := lateKey{account, env}
	c.mu.Lock()
	e, ok := c.late[k]
	c.mu.Unlock()
	if ok && e.none && now.Sub(e.at) < statusTTL {
		return 0, nil
	}
	if !ok || now.Sub(e.at) >= statusTTL {
		all, err := c.store.TooLate(ctx, account, env, time.Unix(0, 0), allTime)
		if err != nil {
			return 0, err
		}
		c.mu.Lock()
		if len(c.late) >= maxLateEntries {
			c.late = map[lateKey]lateEntry{}
		}
		c.late[k] = lateEntry{at: now, none: all == 0}
		c.mu.Unlock()
		if all == 0 {
			return 0, nil
		}
	}
	return c.store.TooLate(ctx, account, env, from, to)
}
