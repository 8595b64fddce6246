package redis

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
)

// Leases take Redis off the path of most calls under load. When a call
// goes to Redis for limits that were busy a moment ago, it asks for as many
// tokens as those limits saw calls in the last demandWindow (at most
// maxLease, and at most an eighth of the burst): Redis charges every bucket
// and the quota for all of them at once, exactly as for that many calls,
// and the calls that follow on this instance use the spare tokens without
// a round trip. When half a lease is spent, the next is asked for ahead of
// need, so a busy limit's calls do not wait for Redis at all. Spare tokens
// not used within leaseTTL of the latest grant go back to Redis.
//
// A quiet limit (fewer than two calls per demandWindow) or a small burst
// (under 16) is never leased: each call is decided in Redis alone, as
// without leases. Redis never allows more than the limit, leased or not;
// what leasing changes is where the spare tokens sit for up to leaseTTL
// (docs/edge.md: the slack of the shared limit).
const (
	leaseTTL     = 50 * time.Millisecond
	demandWindow = 20 * time.Millisecond
	maxLease     = 256
	// Every sweepEvery, leases idle for idleLease are forgotten.
	sweepEvery = 5 * time.Second
	idleLease  = 10 * time.Second
)

// lease is one instance's spare tokens for one set of limits.
type lease struct {
	mu sync.Mutex
	// tokens were granted by Redis at grantedAt and not used yet; gen
	// numbers the grants, so an expiry timer knows whether its grant is
	// still the current one.
	tokens    int
	grantedAt time.Time
	gen       uint64
	// granted is the size of the latest grant.
	granted int
	// res is Redis's answer for the latest grant, after charging it whole;
	// limits are the limits it was granted for.
	res    edge.CallResult
	limits edge.CallLimits
	// asking is open while a call is asking Redis for more than itself.
	asking chan struct{}
	// Demand: calls in the window starting at winStart, and in the last
	// full window.
	winStart          time.Time
	winCalls, lastWin int
	// served counts the calls decided from this lease (Leased). It is
	// counted under mu, which every call holds anyway, rather than in one
	// counter that every core's calls would contend for.
	served uint64
	// swept is set when the sweep forgets the lease, so a slot that still
	// holds it looks it up again.
	swept atomic.Bool
}

// slotted is what a CallLimits.Slot holds: the lease for the limits id.
type slotted struct {
	id leaseID
	le *lease
}

// leaseID names the limits a call is checked against, all of them, so a
// change of plan starts a new lease. The edge's calls have two buckets;
// other shapes put theirs in rest.
type leaseID struct {
	n                   int
	b0, b1, rest, quota string
	rps, burst          int
	quotaLimit          int64
}

func leaseKey(c edge.CallLimits) leaseID {
	id := leaseID{n: len(c.Buckets), quota: c.QuotaBucket, rps: c.RPS, burst: c.Burst, quotaLimit: c.QuotaLimit}
	switch len(c.Buckets) {
	case 2:
		id.b0, id.b1 = c.Buckets[0], c.Buckets[1]
	case 1:
		id.b0 = c.Buckets[0]
	case 0:
	default:
		id.rest = strings.Join(c.Buckets, "\x00")
	}
	return id
}

// leaseCap is the most tokens one lease may hold for c.
func leaseCap(c edge.CallLimits) int {
	return max(1, min(maxLease, c.Burst/8))
}

// leased decides one call from a lease, or in Redis.
func (l *Limiter) leased(c edge.CallLimits) (edge.CallResult, error) {
	now := time.Now()
	if now.UnixNano()-l.lastSweep.Load() >= int64(sweepEvery) && l.sweeping.CompareAndSwap(false, true) {
		l.lastSweep.Store(now.UnixNano())
		go l.sweep()
	}
	le := l.leaseFor(c)
	le.mu.Lock()
	le.count(now)
	if res, ok := le.spend(c, now); ok {
		if le.asking == nil && le.granted >= 2 && le.tokens*2 <= le.granted && !l.returning.Load() {
			// Half the lease is spent: ask for the next one now, so the
			// calls that follow find tokens instead of a round trip.
			le.asking = make(chan struct{})
			go l.prefetch(le, c, le.demand(c), le.asking)
		}
		le.served++
		le.mu.Unlock()
		return res, nil
	}
	if le.asking != nil {
		// A grant for these limits is on its way: waiting for it costs
		// about the round trip this call would make, and saves Redis one.
		le.awaitGrant()
		if res, ok := le.spend(c, time.Now()); ok {
			le.served++
			le.mu.Unlock()
			return res, nil
		}
	}
	want := 1
	if le.asking == nil {
		want = le.demand(c)
	}
	var asked chan struct{}
	if want > 1 {
		asked = make(chan struct{})
		le.asking = asked
	}
	le.mu.Unlock()

	res, grant, err := l.ask(c, want, false)
	le.mu.Lock()
	defer le.mu.Unlock()
	if asked != nil {
		le.asking = nil
		close(asked)
	}
	if err == nil && grant == 0 {
		// Refused, perhaps because this instance holds the last tokens,
		// or is about to: a grant on its way is waited for, and a spare
		// token is used rather than refusing.
		le.awaitGrant()
		if res, ok := le.spend(c, time.Now()); ok {
			return res, nil
		}
	}
	if err != nil || grant <= 1 {
		return res, err
	}
	return l.store(le, c, res, grant, grant-1), nil
}

// leaseFor finds the lease for c's limits: in c's slot when it holds the
// lease for these limits (comparing the limits' names is cheap: the slot's
// owner passes the same strings call after call), else in the map, which
// hashes them all.
func (l *Limiter) leaseFor(c edge.CallLimits) *lease {
	key := leaseKey(c)
	if c.Slot != nil {
		if s, ok := c.Slot.Load().(*slotted); ok && s.id == key && !s.le.swept.Load() {
			return s.le
		}
	}
	v, ok := l.leases.Load(key)
	if !ok {
		v, _ = l.leases.LoadOrStore(key, &lease{})
	}
	le := v.(*lease)
	if c.Slot != nil {
		c.Slot.Store(&slotted{id: key, le: le})
	}
	return le
}

// count counts a call in the lease's demand windows, with le.mu held.
func (le *lease) count(now time.Time) {
	if since := now.Sub(le.winStart); since >= demandWindow {
		le.lastWin = le.winCalls
		if since >= 2*demandWindow {
			le.lastWin = 0
		}
		le.winStart, le.winCalls = now, 0
	}
	le.winCalls++
}

// demand is how many tokens to ask for: as many as the limits saw calls in
// a demand window, within the lease's cap.
func (le *lease) demand(c edge.CallLimits) int {
	return min(leaseCap(c), max(le.lastWin, le.winCalls))
}

// spend uses a spare token if the lease holds one still fresh, with le.mu
// held, and returns the call's answer.
func (le *lease) spend(c edge.CallLimits, now time.Time) (edge.CallResult, bool) {
	if le.tokens == 0 || now.Sub(le.grantedAt) >= leaseTTL {
		return edge.CallResult{}, false
	}
	le.tokens--
	return le.answer(c, now), true
}

// awaitGrant waits for the grant on its way, if there is one, with le.mu
// held (and released while waiting). It waits for that one only: a call
// that then finds no token asks Redis itself rather than queue again.
func (le *lease) awaitGrant() {
	if wait := le.asking; wait != nil {
		le.mu.Unlock()
		<-wait
		le.mu.Lock()
	}
}

// prefetch asks Redis for the lease's next tokens while it still holds
// some.
func (l *Limiter) prefetch(le *lease, c edge.CallLimits, want int, asked chan struct{}) {
	res, grant, err := l.ask(c, want, true)
	le.mu.Lock()
	defer le.mu.Unlock()
	le.asking = nil
	close(asked)
	if err != nil || grant == 0 {
		// Redis is down (the calls will find out for themselves) or has
		// no tokens left: the lease spends what it holds.
		return
	}
	l.store(le, c, res, grant, grant)
}

// store adds spare tokens of a grant of grant tokens to the lease, with
// le.mu held, and returns the answer for a call made now. Tokens still
// fresh stay; stale ones go back to Redis.
func (l *Limiter) store(le *lease, c edge.CallLimits, res edge.CallResult, grant, spare int) edge.CallResult {
	// The lease's life runs from the grant's arrival: Redis charged the
	// tokens during the round trip, so they may be used for up to one
	// round trip plus leaseTTL after they were counted.
	arrived := time.Now()
	if le.tokens > 0 && arrived.Sub(le.grantedAt) >= leaseTTL {
		go l.refund(c, le.tokens)
		le.tokens = 0
	}
	le.gen++
	le.tokens += spare
	le.granted, le.grantedAt, le.res, le.limits = grant, arrived, res, c
	gen := le.gen
	time.AfterFunc(leaseTTL, func() { l.expire(le, gen, c) })
	return le.answer(c, arrived)
}

// answer is the call's answer while the lease holds le.tokens spare
// tokens: Redis's answer for the grant with the spare tokens given back,
// so a lone instance reports what Redis would have.
func (le *lease) answer(c edge.CallLimits, now time.Time) edge.CallResult {
	res := edge.CallResult{Rates: make([]edge.RateResult, len(le.res.Rates)),
		QuotaChecked: le.res.QuotaChecked, QuotaAllowed: le.res.QuotaAllowed,
		QuotaUsed: le.res.QuotaUsed - int64(le.tokens)}
	elapsed := now.Sub(le.grantedAt)
	back := time.Duration(le.tokens) * time.Second / time.Duration(max(1, c.RPS))
	for i, r := range le.res.Rates {
		r.Remaining = min(c.Burst, r.Remaining+le.tokens)
		r.ResetAfter = max(0, r.ResetAfter-elapsed-back)
		res.Rates[i] = r
	}
	return res
}

// expire gives a grant's unused tokens back to Redis once leaseTTL has
// passed, unless a newer grant has replaced it (and given them back).
func (l *Limiter) expire(le *lease, gen uint64, c edge.CallLimits) {
	le.mu.Lock()
	if le.gen != gen || le.tokens == 0 {
		le.mu.Unlock()
		return
	}
	n := le.tokens
	le.tokens = 0
	le.mu.Unlock()
	l.refund(c, n)
}

// refund gives n unused tokens back: each bucket's theoretical arrival
// time moves back by n emission intervals and the quota count drops by n,
// as if the calls they were for had never been counted. A failed refund
// errs towards refusing early, never towards allowing too much.
func (l *Limiter) refund(c edge.CallLimits, n int) {
	keys := make([]string, 0, len(c.Buckets)+1)
	for _, id := range c.Buckets {
		keys = append(keys, gcraPrefix+id)
	}
	if c.QuotaBucket != "" {
		keys = append(keys, c.QuotaBucket)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := refundTokens.Run(ctx, l.rdb, keys, n, len(c.Buckets), 1/float64(max(1, c.RPS))).Err()
	if err != nil {
		l.refundErrs.Add(1)
		return
	}
	l.refunded.Add(uint64(n))
}

// sweep forgets leases that hold no tokens and saw no call for idleLease,
// so keys that come and go (and each month's quota bucket) do not pile up.
func (l *Limiter) sweep() {
	defer l.sweeping.Store(false)
	cutoff := time.Now().Add(-idleLease)
	l.leases.Range(func(k, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		idle := le.tokens == 0 && le.asking == nil && le.winStart.Before(cutoff)
		served := le.served
		le.mu.Unlock()
		if idle && l.leases.CompareAndDelete(k, le) {
			le.swept.Store(true)
			l.sweptServed.Add(served)
		}
		return true
	})
}

// refundTokens gives ARGV[1] tokens back to the first ARGV[2] keys (rate
// buckets: their theoretical arrival time moves back by that many
// emission intervals of ARGV[3] seconds) and to the quota counter after
// them, if any. Keys that have expired meanwhile are left alone: a bucket
// that expired is full, and a quota counter that expired is a new month's.
var refundTokens = redis.NewScript(`
local n = tonumber(ARGV[1])
local buckets = tonumber(ARGV[2])
local ei = tonumber(ARGV[3])
for i = 1, buckets do
  local v = redis.call("GET", KEYS[i])
  if v then redis.call("SET", KEYS[i], tonumber(v) - n * ei, "KEEPTTL") end
end
if #KEYS > buckets then
  local q = KEYS[buckets + 1]
  local v = redis.call("GET", q)
  if v then redis.call("SET", q, math.max(0, tonumber(v) - n), "KEEPTTL") end
end
return 1
`)

// ReturnLeases gives every spare token back to Redis, for a graceful stop:
// otherwise a stopped instance's spare tokens stay counted until the rate
// buckets refill, and against the month's quota for good. No lease asks
// for more tokens ahead of need afterwards.
func (l *Limiter) ReturnLeases() {
	var wg sync.WaitGroup
	l.returning.Store(true)
	l.leases.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		for le.asking != nil {
			le.awaitGrant() // grants on their way are given back with the rest
		}
		n, c := le.tokens, le.limits
		le.tokens = 0
		le.gen++ // the pending expiry has nothing left to give back
		le.mu.Unlock()
		if n > 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.refund(c, n)
			}()
		}
		return true
	})
	wg.Wait()
}
