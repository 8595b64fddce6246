package redis

import (
	"context"
	"fmt"
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
// not used within leaseTTL of the latest grant go back to Redis, when that
// is safe (refundTokens).
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
	// recordTTL is how long Redis keeps the record of a grant, which a
	// refund needs: far longer than any refund can come after the grant.
	recordTTL = 10 * time.Second
	// A bucket's refund ledger keeps each refund for ledgerTTL: a refund
	// needs those of grants up to recordTTL older than its own grant, made
	// up to recordTTL later than theirs.
	ledgerTTL = 2 * recordTTL
	// A lease request whose reply timed out is given back lostGrantDelay
	// later (it may have been granted): after the second the edge stays
	// on its local limiter when Redis fails, and well within recordTTL.
	lostGrantDelay = 2 * time.Second
	// A give-back of a lost grant that failed is tried again this often,
	// while Redis still holds the grant's record (recordTTL).
	lostGrantRetry = time.Second
	// ledgerPrefix names a bucket's refund ledger.
	ledgerPrefix = "rate-refunds:"
	// leasedSuffix names a quota bucket's lease marker, which lives for a
	// second after a lease takes from the quota.
	leasedSuffix = ":leased"
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
	// granted is the size of the latest grant. held names the grants whose
	// tokens the lease may still hold, oldest first.
	granted int
	held    []heldGrant
	// res is Redis's answer for the latest grant, after charging it whole;
	// limits are the limits it was granted for.
	res    edge.CallResult
	limits edge.CallLimits
	// asking is open while a call is asking Redis for more than itself.
	// failed is set when the last such request to finish failed, and
	// failedErr is its error: the calls that waited take the error as
	// their own.
	asking    chan struct{}
	failed    chan struct{}
	failedErr error
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

// heldGrant is a grant whose tokens a lease may still hold: Redis's record
// of it, and at most how many of the lease's tokens are its own. Calls
// spend the oldest tokens first, so the newest grants hold what is left.
type heldGrant struct {
	record string
	tokens int
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
	if wait := le.asking; wait != nil {
		// A grant for these limits is on its way: waiting for it costs
		// about the round trip this call would make, and saves Redis one.
		le.awaitGrant()
		if res, ok := le.spend(c, time.Now()); ok {
			le.served++
			le.mu.Unlock()
			return res, nil
		}
		if le.failed != nil {
			// The request failed, or one after it did (Redis is out of
			// reach, most likely after a read timeout): asking again
			// would have the call wait a second timeout before the
			// fallback decides it. A request that succeeded since would
			// have cleared failed.
			err := le.failedErr
			le.mu.Unlock()
			return edge.CallResult{}, err
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

	res, grant, record, err := l.ask(c, want, false)
	le.mu.Lock()
	defer le.mu.Unlock()
	if asked != nil {
		le.finishAsking(asked, err)
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
	return l.store(le, c, res, grant, grant-1, record), nil
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

// finishAsking ends the request for more tokens asked for on asked, with
// le.mu held, noting its error for the calls that waited for it.
func (le *lease) finishAsking(asked chan struct{}, err error) {
	le.asking = nil
	if err != nil {
		le.failed, le.failedErr = asked, err
	} else if le.failed != nil {
		le.failed, le.failedErr = nil, nil
	}
	close(asked)
}

// prefetch asks Redis for the lease's next tokens while it still holds
// some.
func (l *Limiter) prefetch(le *lease, c edge.CallLimits, want int, asked chan struct{}) {
	res, grant, record, err := l.ask(c, want, true)
	le.mu.Lock()
	defer le.mu.Unlock()
	le.finishAsking(asked, err)
	if err != nil || grant == 0 {
		// Redis is down (the calls will find out for themselves) or has
		// no tokens left: the lease spends what it holds.
		return
	}
	l.store(le, c, res, grant, grant, record)
}

// store adds spare tokens of a grant of grant tokens, recorded in Redis
// under record, to the lease, with le.mu held, and returns the answer for a
// call made now. Tokens still fresh stay; stale ones go back to Redis.
func (l *Limiter) store(le *lease, c edge.CallLimits, res edge.CallResult, grant, spare int, record string) edge.CallResult {
	// The lease's life runs from the grant's arrival: Redis charged the
	// tokens during the round trip, so they may be used for up to one
	// round trip plus leaseTTL after they were counted.
	arrived := time.Now()
	if le.tokens > 0 && arrived.Sub(le.grantedAt) >= leaseTTL {
		l.refunds.start()
		go func(n int, held []heldGrant) {
			defer l.refunds.done()
			l.refund(c, n, held)
		}(le.tokens, le.held)
		le.tokens = 0
	}
	le.gen++
	le.held = append(keepHeld(le.held, le.tokens), heldGrant{record: record, tokens: spare})
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
	n, held := le.tokens, le.held
	le.tokens, le.held = 0, nil
	l.refunds.start() // with le.mu held: ReturnLeases sees it (refunds)
	le.mu.Unlock()
	defer l.refunds.done()
	l.refund(c, n, held)
}

// keepHeld returns the newest of held that can hold n tokens, in a new
// slice: the older grants' tokens have all been spent.
func keepHeld(held []heldGrant, n int) []heldGrant {
	i := len(held)
	for left := n; i > 0 && left > 0; i-- {
		left -= held[i-1].tokens
	}
	return append([]heldGrant(nil), held[i:]...)
}

// refund gives a lease's n unused tokens back, each against the record of
// the grant it came from, the newest grants' first. refundTokens says what
// goes back, and when.
func (l *Limiter) refund(c edge.CallLimits, n int, held []heldGrant) {
	for i := len(held) - 1; i >= 0 && n > 0; i-- {
		k := min(n, held[i].tokens)
		l.refundGrant(c, k, held[i].record)
		n -= k
	}
}

// refundLost gives back, lostGrantDelay from now, the grant recorded under
// record of a lease request for want tokens whose reply was lost. If Redis
// did not run the request, or refused it, there is no record and nothing
// goes back; if it did, none of the grant was used.
func (l *Limiter) refundLost(c edge.CallLimits, want int, record string) {
	l.refunds.mu.Lock()
	defer l.refunds.mu.Unlock()
	if l.refunds.lost == nil {
		l.refunds.lost = make(map[string]lostGrant)
	}
	timer := time.AfterFunc(lostGrantDelay, func() { l.sendLost(record) })
	l.refunds.lost[record] = lostGrant{c: c, want: want, timer: timer, lostAt: time.Now()}
}

// sendLost gives back the lost grant recorded under record, unless
// ReturnLeases has already. A give-back that fails (Redis still out of
// reach) is tried again every lostGrantRetry while Redis may still hold
// the grant's record: once, a Redis down for more than lostGrantDelay left
// each lost grant counted against the month's quota.
func (l *Limiter) sendLost(record string) {
	l.refunds.mu.Lock()
	g, ok := l.refunds.lost[record]
	delete(l.refunds.lost, record)
	if ok {
		l.refunds.startLocked()
	}
	l.refunds.mu.Unlock()
	if !ok {
		return
	}
	defer l.refunds.done()
	if err := l.refundGrant(g.c, g.want, record); err == nil || time.Since(g.lostAt)+lostGrantRetry >= recordTTL-lostGrantRetry {
		return
	}
	l.refunds.mu.Lock()
	defer l.refunds.mu.Unlock()
	if l.returning.Load() {
		return // ReturnLeases gives back what it finds, once
	}
	g.timer = time.AfterFunc(lostGrantRetry, func() { l.sendLost(record) })
	l.refunds.lost[record] = g
}

// lostGrant is a lease request whose reply was lost, waiting to be given
// back.
type lostGrant struct {
	c      edge.CallLimits
	want   int
	timer  *time.Timer
	lostAt time.Time
}

// refunds tracks the refunds in flight, so a graceful stop can wait for
// them before the Redis client closes, and the lost grants waiting to be
// given back. (A WaitGroup would do for the first, but its Wait cannot be
// bounded by a context, and an expiry that starts a refund while a stop
// waits would be an Add racing a Wait.)
type refunds struct {
	mu       sync.Mutex
	inFlight int
	// idle is closed when inFlight falls to 0.
	idle chan struct{}
	lost map[string]lostGrant
}

func (r *refunds) start() {
	r.mu.Lock()
	r.startLocked()
	r.mu.Unlock()
}

func (r *refunds) startLocked() {
	if r.inFlight == 0 {
		r.idle = make(chan struct{})
	}
	r.inFlight++
}

func (r *refunds) done() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inFlight--
	if r.inFlight == 0 {
		close(r.idle)
	}
}

// wait waits until no refund is in flight, or ctx is done.
func (r *refunds) wait(ctx context.Context) error {
	r.mu.Lock()
	idle := r.idle
	if r.inFlight == 0 {
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// refundGrant gives n unused tokens of the grant Redis recorded under
// record back. A failed refund errs towards refusing early, never towards
// allowing too much.
func (l *Limiter) refundGrant(c edge.CallLimits, n int, record string) error {
	keys := make([]string, 0, 2*len(c.Buckets)+2)
	for _, id := range c.Buckets {
		keys = append(keys, gcraPrefix+id)
	}
	if c.QuotaBucket != "" {
		keys = append(keys, c.QuotaBucket)
	}
	keys = append(appendLedgers(keys, c), record)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	back, err := refundTokens.Run(ctx, l.rdb, keys, n, len(c.Buckets), 1/float64(max(1, c.RPS)),
		int64(ledgerTTL.Seconds())).Int()
	if err != nil {
		l.refundErrs.Add(1)
		return err
	}
	l.refunded.Add(uint64(back))
	return nil
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

// appendLedgers appends the refund ledgers of c's buckets to keys.
func appendLedgers(keys []string, c edge.CallLimits) []string {
	for _, id := range c.Buckets {
		keys = append(keys, ledgerPrefix+id)
	}
	return keys
}

// refundTokens gives back ARGV[1] unused tokens of a lease. KEYS: ARGV[2]
// rate buckets (emission interval e = ARGV[3] seconds), the quota counter
// if any, each bucket's refund ledger, then the record of the grant the
// tokens came from: its size g, Redis's time at the grant t_g, and each
// bucket's arrival time (TAT) right after it, tat_g. A ledger is a sorted
// set of the refunds on its bucket, scored by their grant's time, each
// with its own time and how far it moved the TAT back; it keeps them
// ARGV[4] seconds. Returns the tokens given back: to the quota when there
// is one, else the fewest any bucket took.
//
// GCRA's TAT is the end of a queue of charged tokens, each e seconds long,
// that drains as Redis's clock passes it; a charge adds tokens at the end
// (after a new start at now, when the queue has drained). A refund of m
// tokens takes them out of the queue, and every token after them moves
// forward by m·e: the TAT moves back by m·e. If none of those m tokens had
// drained, ever, that is exactly the queue the bucket would hold had they
// never been charged: every charge since found the queue as long, less
// m·e, and so passed GCRA's test there too and was added the same way.
// The fleet's history is then a valid GCRA history in which each lease
// got just the tokens it used, and GCRA's own bound holds for it: at most
// burst + rate × T + 1 calls in any T.
//
// A lease's unused tokens are taken to be the last m of its grant (m <= g;
// tokens left from an earlier grant go back against that grant's record).
// Right after the grant they ended at tat_g; since then they have moved
// forward only by the refunds of tokens charged before them: of grants
// made no later than t_g (ties counted, to be safe), made since t_g. Call
// that ΔR. Tokens only move forward and the clock only moves on, so if
//
//	now + m·e + ΔR <= tat_g
//
// they have not drained, and never had. Each bucket takes back the most
// tokens, up to n and g, that keep this; tokens a bucket has refilled
// since the grant are never given back, and tokens not given back stay
// charged until the bucket refills, which only refuses early. A ledger
// entry outlives every record that can need it, as recordTTL and
// ledgerTTL say.
//
// The quota counter goes down by n, at most g, floored at 0, while the
// record exists. A lost grant is given back by the size it asked for, and
// near the end of a month Redis grants less than that: only g was ever
// counted. Counting has no refill: as long as the counter still holds the
// grant, n unused tokens taken off leave exactly the count of the calls
// made. The
// record is written by the same script run as the grant, so a Redis that
// lost the grant (a restart without persistence, a failover to a replica
// that was behind) has lost the record too, and a fresh counter is left
// alone. The record goes with the refund, so it is never applied twice.
var refundTokens = redis.NewScript(`
redis.replicate_commands()
local rec = redis.call("GET", KEYS[#KEYS])
if not rec then return 0 end
redis.call("DEL", KEYS[#KEYS])
local f = {}
for w in string.gmatch(rec, "%S+") do f[#f + 1] = tonumber(w) end
local t = redis.call("TIME")
local now = (t[1] - 1483228800) + (t[2] / 1000000)
local n = tonumber(ARGV[1])
local buckets = tonumber(ARGV[2])
local e = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local g, t_g = f[1], f[2]
local ledgers = #KEYS - buckets
local back = math.min(n, g)
for i = 1, buckets do
  local ledger = KEYS[ledgers + i - 1]
  redis.call("ZREMRANGEBYSCORE", ledger, "-inf", "(" .. string.format("%.17g", now - keep))
  -- Refunds since t_g of grants made no later than t_g.
  local dr = 0
  for _, entry in ipairs(redis.call("ZRANGEBYSCORE", ledger, string.format("%.17g", now - keep), string.format("%.17g", t_g))) do
    local at, moved = string.match(entry, "^(%S+) (%S+)")
    if tonumber(at) >= t_g then dr = dr + tonumber(moved) end
  end
  local v = tonumber(redis.call("GET", KEYS[i]) or "")
  local m = 0
  if v then m = math.max(0, math.min(n, g, math.floor((f[2 + i] - now - dr) / e))) end
  if m > 0 then
    redis.call("SET", KEYS[i], v - m * e, "KEEPTTL")
    redis.call("ZADD", ledger, string.format("%.17g", t_g),
      string.format("%.17g %.17g ", now, m * e) .. KEYS[#KEYS])
    redis.call("EXPIRE", ledger, keep)
  end
  back = math.min(back, m)
end
if #KEYS - 1 > 2 * buckets then
  local q = KEYS[buckets + 1]
  local v = redis.call("GET", q)
  if not v then return 0 end
  local qn = math.min(n, g)
  redis.call("SET", q, math.max(0, tonumber(v) - qn), "KEEPTTL")
  back = qn
end
return back
`)

// ReturnLeases gives every spare token back to Redis, for a graceful stop:
// otherwise a stopped instance's spare tokens stay counted until the rate
// buckets refill, and against the month's quota for good. Lost grants
// waiting to be given back go at once. It returns when every refund,
// these and those already in flight, is done, or with ctx's error when ctx
// is done first. No lease asks for more tokens ahead of need afterwards.
func (l *Limiter) ReturnLeases(ctx context.Context) error {
	l.returning.Store(true)
	l.leases.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		for le.asking != nil {
			le.awaitGrant() // grants on their way are given back with the rest
		}
		n, c, held := le.tokens, le.limits, le.held
		le.tokens, le.held = 0, nil
		le.gen++ // the pending expiry has nothing left to give back
		le.mu.Unlock()
		if n > 0 {
			l.refunds.start()
			go func() {
				defer l.refunds.done()
				l.refund(c, n, held)
			}()
		}
		return true
	})
	l.refunds.mu.Lock()
	for record, g := range l.refunds.lost {
		// A timer that fires meanwhile finds its grant gone (sendLost).
		g.timer.Stop()
		delete(l.refunds.lost, record)
		l.refunds.startLocked()
		go func() {
			defer l.refunds.done()
			l.refundGrant(g.c, g.want, record)
		}()
	}
	l.refunds.mu.Unlock()
	if err := l.refunds.wait(ctx); err != nil {
		return fmt.Errorf("return leases: %w", err)
	}
	return nil
}
