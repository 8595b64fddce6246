package edge

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/schemas"
)

// RateResult is one limiter's answer for one call.
type RateResult struct {
	Allowed bool
	// Limit is the burst: calls allowed at once from a full bucket.
	Limit int
	// Remaining is how many calls could be made right now.
	Remaining int
	// RetryAfter is when the next call would be allowed (when refused).
	RetryAfter time.Duration
	// ResetAfter is when the bucket is full again.
	ResetAfter time.Duration
	// Rate, when not zero, is the refill per second the bucket was decided
	// with, where it is not the plan's (the local fallback's share of it,
	// which may be a fraction: 5 a second over 10 instances is 0.5).
	Rate float64
}

// RateLimiter is a GCRA (or equivalent) limiter shared by every edge
// instance: id names the bucket, rps and burst size it.
type RateLimiter interface {
	Allow(ctx context.Context, id string, rps, burst int) (RateResult, error)
}

// QuotaCounter counts calls against a fixed-period allowance. Take counts
// one call in bucket unless that would exceed limit, and returns the count
// after the call (or the count that refused it).
type QuotaCounter interface {
	Take(ctx context.Context, bucket string, limit int64, ttl time.Duration) (used int64, allowed bool, err error)
}

// CallLimits is everything one call is checked against: the rate-limit
// buckets in order (all sized rps and burst), then, if every bucket allowed
// the call, the quota counter when QuotaBucket is set.
type CallLimits struct {
	Buckets    []string
	RPS, Burst int
	// QuotaBucket empty means no quota; QuotaLimit negative means no limit.
	QuotaBucket string
	QuotaLimit  int64
	QuotaTTL    time.Duration
	// Slot, when set, is where a limiter may keep what it found for these
	// limits the last time (the same caller's slot comes back with the
	// same limits, call after call), so the next call skips the lookup. A
	// limiter must check that what it finds there is for these limits.
	Slot *LimitSlot
}

// LimitSlot holds a limiter's state for one caller's limits; the zero
// value is empty.
type LimitSlot struct{ v atomic.Value }

// Load returns what was stored, or nil.
func (s *LimitSlot) Load() any { return s.v.Load() }

// Store keeps v, which must always be of the same concrete type.
func (s *LimitSlot) Store(v any) { s.v.Store(v) }

// CallResult answers CallLimits.
type CallResult struct {
	// Rates has one result per bucket checked; it ends at the first refusal,
	// so later buckets are neither checked nor charged.
	Rates []RateResult
	// QuotaChecked reports whether the quota was counted (every bucket
	// allowed the call and a quota was asked for); QuotaUsed and
	// QuotaAllowed are then QuotaCounter.Take's answer.
	QuotaChecked bool
	QuotaUsed    int64
	QuotaAllowed bool
	// QuotaLeased, with a refusal, says that a lease took from the quota
	// within the last second: spare calls may sit in another instance's
	// lease and come back within moments, so the caller is told to retry
	// shortly rather than at the month's end.
	QuotaLeased bool
	// QuotaShare is set when the quota was counted against a share of
	// QuotaLimit rather than the whole (the local fallback counts each
	// instance's share): the limit the answer and its headers are about.
	QuotaShare *int64
	// ShareUntil, with QuotaShare, is when a fallback that counted the
	// share because the shared store is out of reach asks that store
	// again: the share holds until then, not until the month's end.
	// Zero for a limiter that only ever counts shares.
	ShareUntil time.Time
}

// CallLimiter decides a whole call at once, with the answers AllowCallEach
// would give, so a shared store can do it in one round trip (or, leasing
// tokens ahead, in fewer than one: its counts may then lag the store's by
// the refill since the lease, as docs/edge.md says). One difference: a
// call it refuses charges nothing, where AllowCallEach has charged the
// buckets before the one that refused (every bucket, when the quota
// refused), and they report one token fewer.
type CallLimiter interface {
	AllowCall(ctx context.Context, c CallLimits) (CallResult, error)
}

// AllowCallEach decides c step by step: each bucket through rl until one
// refuses, then the quota through q (nil = no quota). Each step charges as
// it goes, so a refused call has used a token of each bucket that allowed
// it.
func AllowCallEach(ctx context.Context, rl RateLimiter, q QuotaCounter, c CallLimits) (CallResult, error) {
	res := CallResult{Rates: make([]RateResult, 0, len(c.Buckets))}
	for _, id := range c.Buckets {
		r, err := rl.Allow(ctx, id, c.RPS, c.Burst)
		if err != nil {
			return CallResult{}, fmt.Errorf("rate limit: %w", err)
		}
		res.Rates = append(res.Rates, r)
		if !r.Allowed {
			return res, nil
		}
	}
	if c.QuotaBucket == "" || q == nil {
		return res, nil
	}
	used, ok, err := q.Take(ctx, c.QuotaBucket, c.QuotaLimit, c.QuotaTTL)
	if err != nil {
		return CallResult{}, fmt.Errorf("quota: %w", err)
	}
	res.QuotaChecked, res.QuotaUsed, res.QuotaAllowed = true, used, ok
	if sq, ok := q.(interface{ QuotaShare(limit int64) int64 }); ok {
		share := sq.QuotaShare(c.QuotaLimit)
		res.QuotaShare = &share
	}
	return res, nil
}

// LocalLimiter is the in-process fallback used while Redis is unreachable:
// a token bucket (equivalent to GCRA for a single process) per id, sized at
// limit / instances so that the fleet as a whole stays near the limit.
type LocalLimiter struct {
	instances int
	mu        sync.Mutex
	buckets   map[string]*rate.Limiter
	quota     map[string]int64
}

// NewLocalLimiter returns a fallback limiter for a fleet of instances.
func NewLocalLimiter(instances int) *LocalLimiter {
	return &LocalLimiter{instances: max(instances, 1), buckets: map[string]*rate.Limiter{}, quota: map[string]int64{}}
}

// maxLocalBuckets bounds the fallback's memory; it is cleared when full,
// which only ever errs towards allowing calls.
const maxLocalBuckets = 100_000

// Allow implements RateLimiter locally.
func (l *LocalLimiter) Allow(_ context.Context, id string, rps, burst int) (RateResult, error) {
	r, b := l.share(rps, burst)
	l.mu.Lock()
	lim := l.bucket(id, r, b)
	now := time.Now()
	allowed := lim.AllowN(now, 1)
	res := bucketResult(lim, now, r, b, allowed)
	l.mu.Unlock()
	return res, nil
}

// AllowCall implements CallLimiter locally, as the Redis script decides a
// call: it is charged to every bucket and to this instance's quota share
// only if all of them can give it one, so a refused call charges nothing,
// where AllowCallEach would have charged the buckets before the refusal.
func (l *LocalLimiter) AllowCall(_ context.Context, c CallLimits) (CallResult, error) {
	r, b := l.share(c.RPS, c.Burst)
	res := CallResult{Rates: make([]RateResult, 0, len(c.Buckets))}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	lims := make([]*rate.Limiter, 0, len(c.Buckets))
	for _, id := range c.Buckets {
		lim := l.bucket(id, r, b)
		if lim.TokensAt(now) < 1 {
			res.Rates = append(res.Rates, bucketResult(lim, now, r, b, false))
			for i, done := range lims {
				res.Rates[i] = bucketResult(done, now, r, b, true)
			}
			return res, nil
		}
		lims = append(lims, lim)
		res.Rates = append(res.Rates, RateResult{})
	}
	if c.QuotaBucket != "" {
		share := l.QuotaShare(c.QuotaLimit)
		if len(l.quota) >= maxLocalBuckets {
			clear(l.quota)
		}
		n := l.quota[c.QuotaBucket]
		res.QuotaChecked, res.QuotaShare = true, &share
		if c.QuotaLimit >= 0 && n >= share {
			res.QuotaUsed = n
			for i, lim := range lims {
				res.Rates[i] = bucketResult(lim, now, r, b, true)
			}
			return res, nil
		}
		l.quota[c.QuotaBucket] = n + 1
		res.QuotaUsed, res.QuotaAllowed = n+1, true
	}
	for i, lim := range lims {
		lim.AllowN(now, 1) // has the token: checked above, under l.mu
		res.Rates[i] = bucketResult(lim, now, r, b, true)
	}
	return res, nil
}

// share is each instance's part of a plan's rate and burst: the rate
// exactly (a fraction when the instances do not divide it: rounded to
// whole calls, 5 a second over 3 instances let the fleet make 3, and over
// 10 instances 10), and the burst rounded up to whole calls, at least one,
// so that the error is on the side of allowing.
func (l *LocalLimiter) share(rps, burst int) (r float64, b int) {
	n := l.instances
	return float64(max(1, rps)) / float64(n), max(1, (burst+n-1)/n)
}

// bucket returns id's bucket at rate r and burst b, made anew when the
// plan changed. l.mu must be held.
func (l *LocalLimiter) bucket(id string, r float64, b int) *rate.Limiter {
	lim, ok := l.buckets[id]
	if !ok || lim.Burst() != b || lim.Limit() != rate.Limit(r) {
		if len(l.buckets) >= maxLocalBuckets {
			clear(l.buckets)
		}
		lim = rate.NewLimiter(rate.Limit(r), b)
		l.buckets[id] = lim
	}
	return lim
}

// bucketResult is lim's answer at now, after the call was charged to it
// or not.
func bucketResult(lim *rate.Limiter, now time.Time, r float64, b int, allowed bool) RateResult {
	tokens := lim.TokensAt(now)
	res := RateResult{Allowed: allowed, Limit: b, Rate: r, Remaining: max(0, int(math.Floor(tokens)))}
	if !allowed {
		res.RetryAfter = time.Duration((1 - tokens) / r * float64(time.Second))
	}
	res.ResetAfter = time.Duration((float64(b) - tokens) / r * float64(time.Second))
	return res
}

// QuotaShare is the part of a monthly quota of limit calls each instance
// allows while it decides alone: at least one call of a quota that has
// any, as a burst's share is (a quota smaller than the fleet refused every
// call, the first included, for the whole outage; the fleet may now pass
// such a quota by up to the instances less the quota).
func (l *LocalLimiter) QuotaShare(limit int64) int64 {
	if limit <= 0 {
		return 0
	}
	return max(1, limit/int64(l.instances))
}

// Take implements QuotaCounter locally: each instance allows its share.
func (l *LocalLimiter) Take(_ context.Context, bucket string, limit int64, _ time.Duration) (int64, bool, error) {
	share := l.QuotaShare(limit)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.quota) >= maxLocalBuckets {
		clear(l.quota)
	}
	n := l.quota[bucket]
	if limit >= 0 && n >= share {
		return n, false, nil
	}
	l.quota[bucket] = n + 1
	return n + 1, true, nil
}

// seedQuota has bucket's local count start from used, the count Redis last
// reported for it, in this instance's part (used / instances, rounded up),
// plus owed, the calls this instance allowed that Redis's count may not hold
// yet: the share left is then this instance's part of what the month has
// left, not a whole share more. With exact, the count is set so; without
// (owed is not known), a count already past it stays.
func (l *LocalLimiter) seedQuota(bucket string, used, owed int64, exact bool) {
	part := (used+int64(l.instances)-1)/int64(l.instances) + owed
	l.mu.Lock()
	defer l.mu.Unlock()
	if n, ok := l.quota[bucket]; !ok || n < part || exact && n != part {
		if !ok && len(l.quota) >= maxLocalBuckets {
			clear(l.quota)
		}
		l.quota[bucket] = part
	}
}

// QuotaAdder is a quota counter that can count calls decided elsewhere:
// FallbackLimiter hands it the calls its local limiter allowed while it
// was unreachable. Each add is the batch seq of sender, which numbers its
// batches in the order it sends them to a bucket: a batch whose number is
// not above the last the counter took from sender for bucket (an add sent
// again after its reply was lost) adds nothing. A counter created by the
// call expires after ttl. It returns the count with them.
type QuotaAdder interface {
	AddQuota(ctx context.Context, bucket, sender string, seq uint64, n int64, ttl time.Duration) (int64, error)
}

// owedCalls are calls the local fallback allowed against a quota bucket,
// not yet in the primary's count.
type owedCalls struct {
	n   int64
	ttl time.Duration
}

// settleBatch is owed calls sent to the primary as one numbered batch,
// sent again under that number until the primary says it holds them.
type settleBatch struct {
	bucket string
	seq    uint64
	owedCalls
}

// ErrLimitState marks a limiter error about one call's stored state (a
// Redis key of the wrong type, say), not about the limiter's availability.
// FallbackLimiter decides that call locally and keeps the primary for every
// other call, where an unavailable primary sends every call to the local
// limiter for its cooldown.
var ErrLimitState = errors.New("the call's stored limit state is unusable")

// FallbackLimiter uses primary (Redis) and, when it fails, the local
// limiter, reporting each fallback through OnFallback. After a failure it
// stays on the local limiter for Cooldown before trying Redis again, so a
// dead Redis costs one timeout per Cooldown, not one per call.
type FallbackLimiter struct {
	Primary interface {
		RateLimiter
		QuotaCounter
	}
	Local      *LocalLimiter
	OnFallback func(what string, err error)
	// Cooldown defaults to one second.
	Cooldown time.Duration
	// downUntil is a UnixNano time before which Redis is not tried.
	downUntil atomic.Int64
	// seen is the count the primary last reported per quota bucket
	// (*atomic.Int64), which the local fallback counts on from; seenN
	// bounds it.
	seen  sync.Map
	seenN atomic.Int64
	// owed holds, per quota bucket, the calls the local fallback allowed,
	// added to the primary's count (a QuotaAdder) once it answers again;
	// settling is set while that runs. A settle moves them to sent,
	// numbered batches that stay there until the primary has counted them
	// (a batch whose reply was lost is sent again under its number, which
	// the primary counts once); sentN is sent's calls per bucket. sender
	// names this limiter to the primary, and seq numbers its batches.
	owedMu   sync.Mutex
	owed     map[string]owedCalls
	sent     []settleBatch
	sentN    map[string]int64
	sender   string
	seq      uint64
	hasOwed  atomic.Bool
	settling atomic.Bool
	// settleAfter (UnixNano) spaces the tries after a failed one.
	settleAfter atomic.Int64
}

// answered notes a primary's answer: the quota count it reported, and that
// it answers again, so what the fallback owes it can go.
func (f *FallbackLimiter) answered(bucket string, checked bool, used int64) {
	if checked && bucket != "" {
		f.saw(bucket, used)
	}
	if f.hasOwed.Load() && time.Now().UnixNano() >= f.settleAfter.Load() && f.settling.CompareAndSwap(false, true) {
		go func() {
			defer f.settling.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = f.settle(ctx)
		}()
	}
}

// saw notes used as the primary's count for bucket, unless a higher one
// was seen: counts only grow within a month's bucket, and answers arrive
// out of order.
func (f *FallbackLimiter) saw(bucket string, used int64) {
	v, ok := f.seen.Load(bucket)
	if !ok {
		if f.seenN.Add(1) > maxLocalBuckets {
			f.seen.Clear()
			f.seenN.Store(0)
		}
		v, _ = f.seen.LoadOrStore(bucket, new(atomic.Int64))
	}
	p := v.(*atomic.Int64)
	for {
		cur := p.Load()
		if used <= cur || p.CompareAndSwap(cur, used) {
			return
		}
	}
}

// local decides a call's quota on the local limiter, counted on from what
// the primary last reported for its bucket and what this instance owes it,
// and owes the primary each call allowed. decide is the local limiter's
// answer.
func (f *FallbackLimiter) local(bucket string, ttl time.Duration, owe bool, decide func() (allowed bool, err error)) error {
	_, adds := f.Primary.(QuotaAdder)
	owe = owe && adds && bucket != ""
	if owe {
		// Held from the count to the note of what is owed, so that two
		// calls decided at once do not both count without the other.
		f.owedMu.Lock()
		defer f.owedMu.Unlock()
	}
	if bucket != "" {
		if v, ok := f.seen.Load(bucket); ok {
			// What this instance owes is exactly what it allowed beyond
			// the primary's last count, so the count is set from it: a
			// count kept from an earlier outage, since paid back, does
			// not count twice. Not for a bucket whose calls go unrecorded
			// (owed is full): its count only grows, as before.
			// The maps are read under owedMu, so only when owe holds it:
			// a call that owes nothing (its primary's state is broken)
			// read them while calls that owe wrote them, and Go ends the
			// process on a map read during a write.
			var owed int64
			exact := false
			if owe {
				_, owing := f.owed[bucket]
				exact = owing || f.sentN[bucket] > 0 || len(f.owed) < maxLocalBuckets
				if exact {
					owed = f.owed[bucket].n + f.sentN[bucket]
				}
			}
			f.Local.seedQuota(bucket, v.(*atomic.Int64).Load(), owed, exact)
		}
	}
	allowed, err := decide()
	if err != nil || !allowed || !owe {
		return err
	}
	if f.owed == nil {
		f.owed = map[string]owedCalls{}
	}
	if len(f.owed) < maxLocalBuckets {
		o := f.owed[bucket]
		f.owed[bucket] = owedCalls{n: o.n + 1, ttl: ttl}
	}
	f.hasOwed.Store(true)
	return nil
}

// Settle adds what the local fallback allowed while the primary was out of
// reach to the primary's quota counts, for a graceful stop: otherwise an
// instance stopped before its next answer from the primary takes those
// calls with it. It waits for a settle already running; what fails stays
// owed, and the first error is returned.
func (f *FallbackLimiter) Settle(ctx context.Context) error {
	for !f.settling.CompareAndSwap(false, true) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	defer f.settling.Store(false)
	return f.settle(ctx)
}

// settle adds what the fallback owes to the primary's counts. What fails
// stays owed, for the next answer to try again, under the same batch name:
// a failure may be a lost reply to an add that was counted. The caller
// holds settling.
func (f *FallbackLimiter) settle(ctx context.Context) error {
	if !f.hasOwed.Load() {
		return nil
	}
	f.owedMu.Lock()
	if f.sentN == nil {
		f.sentN = map[string]int64{}
	}
	if f.sender == "" {
		f.sender = rand.Text()
	}
	for bucket, o := range f.owed {
		f.seq++
		f.sent = append(f.sent, settleBatch{bucket: bucket, seq: f.seq, owedCalls: o})
		f.sentN[bucket] += o.n
	}
	f.owed = nil
	batches, sender := slices.Clone(f.sent), f.sender
	f.hasOwed.Store(false)
	f.owedMu.Unlock()
	qa := f.Primary.(QuotaAdder)
	var first error
	// A bucket's batches go in the order they were numbered, and none
	// after one that failed: the primary takes a batch only if its
	// number is above the last it took for the bucket.
	failed, done := map[string]bool{}, map[uint64]bool{}
	for _, b := range batches {
		if failed[b.bucket] {
			continue
		}
		count, err := qa.AddQuota(ctx, b.bucket, sender, b.seq, b.n, b.ttl)
		if err != nil {
			first = cmp.Or(first, err)
			failed[b.bucket] = true
			f.settleAfter.Store(time.Now().Add(time.Second).UnixNano())
			f.hasOwed.Store(true)
			continue
		}
		// The count the add made, not the last seen plus what was owed:
		// answers between the two already held the owed calls. Noted
		// before the batch leaves sent, so that a call decided locally
		// meanwhile counts it twice rather than not at all.
		f.saw(b.bucket, count)
		f.owedMu.Lock()
		if f.sentN[b.bucket] -= b.n; f.sentN[b.bucket] <= 0 {
			delete(f.sentN, b.bucket)
		}
		f.owedMu.Unlock()
		done[b.seq] = true
	}
	// Only a settle changes sent past its start, and one runs at a time:
	// the batches counted leave it in one pass, not one pass each.
	if len(done) > 0 {
		f.owedMu.Lock()
		f.sent = slices.DeleteFunc(f.sent, func(s settleBatch) bool { return done[s.seq] })
		f.owedMu.Unlock()
	}
	return first
}

var (
	_ CallLimiter = (*FallbackLimiter)(nil)
	_ CallLimiter = (*LocalLimiter)(nil)
)

func (f *FallbackLimiter) primaryDown() bool {
	d := f.downUntil.Load()
	if d == 0 {
		return false // the usual case, without reading the clock
	}
	if time.Now().UnixNano() < d {
		return true
	}
	f.downUntil.CompareAndSwap(d, 0) // the cooldown is over
	return false
}

func (f *FallbackLimiter) cooldown() time.Duration {
	if f.Cooldown == 0 {
		return time.Second
	}
	return f.Cooldown
}

func (f *FallbackLimiter) failed(what string, err error) {
	f.downUntil.Store(time.Now().Add(f.cooldown()).UnixNano())
	if f.OnFallback != nil {
		f.OnFallback(what, err)
	}
}

// Allow implements RateLimiter.
func (f *FallbackLimiter) Allow(ctx context.Context, id string, rps, burst int) (RateResult, error) {
	if !f.primaryDown() {
		r, err := f.Primary.Allow(ctx, id, rps, burst)
		if err == nil {
			return r, nil
		}
		f.failed("rate", err)
	} else if f.OnFallback != nil {
		f.OnFallback("rate", nil)
	}
	return f.Local.Allow(ctx, id, rps, burst)
}

// Take implements QuotaCounter.
func (f *FallbackLimiter) Take(ctx context.Context, bucket string, limit int64, ttl time.Duration) (int64, bool, error) {
	if !f.primaryDown() {
		n, ok, err := f.Primary.Take(ctx, bucket, limit, ttl)
		if err == nil {
			f.answered(bucket, true, n)
			return n, ok, nil
		}
		f.failed("quota", err)
	} else if f.OnFallback != nil {
		f.OnFallback("quota", nil)
	}
	var n int64
	var ok bool
	err := f.local(bucket, ttl, true, func() (bool, error) {
		var err error
		n, ok, err = f.Local.Take(ctx, bucket, limit, ttl)
		return ok, err
	})
	return n, ok, err
}

// AllowCall implements CallLimiter: in one step on the primary when it
// can (one Redis round trip), otherwise step by step; on a primary failure
// the whole call is decided locally.
func (f *FallbackLimiter) AllowCall(ctx context.Context, c CallLimits) (CallResult, error) {
	// A call whose own state in Redis is unusable (ErrLimitState) is
	// decided locally without owing Redis its count: adding to that state
	// would fail too, on every later answer.
	owe := true
	if !f.primaryDown() {
		var r CallResult
		var err error
		if cl, ok := f.Primary.(CallLimiter); ok {
			r, err = cl.AllowCall(ctx, c)
		} else {
			r, err = AllowCallEach(ctx, f.Primary, f.Primary, c)
		}
		switch {
		case err == nil:
			f.answered(c.QuotaBucket, r.QuotaChecked, r.QuotaUsed)
			return r, nil
		case errors.Is(err, ErrLimitState):
			owe = false
			if f.OnFallback != nil {
				f.OnFallback("rate", err)
			}
		default:
			f.failed("rate", err)
		}
	} else if f.OnFallback != nil {
		f.OnFallback("rate", nil)
	}
	var r CallResult
	err := f.local(c.QuotaBucket, c.QuotaTTL, owe, func() (bool, error) {
		var err error
		r, err = f.Local.AllowCall(ctx, c)
		return r.QuotaAllowed, err
	})
	if r.QuotaShare != nil {
		if d := f.downUntil.Load(); d != 0 {
			r.ShareUntil = time.Unix(0, d)
		} else { // decided here for its own state's sake: asked again next call
			r.ShareUntil = time.Now().Add(f.cooldown())
		}
	}
	return r, err
}

// quotaPeriod is the calendar month containing now in loc: its start and
// end, and its bucket suffix. The month is chosen by instant, not by local
// date: where clocks fall back over a month's first midnight, a month
// begins at the first of its two midnights (caltime.MonthStart), and the
// hour after it reads as the month before's last day again.
func quotaPeriod(now time.Time, loc *time.Location) (start, end time.Time, suffix string) {
	t := now.In(loc)
	y, m := t.Year(), t.Month()
	if end = caltime.MonthStart(y, m+1, loc); !now.Before(end) {
		m++
		end = caltime.MonthStart(y, m+1, loc)
	}
	month := time.Date(y, m, 1, 0, 0, 0, 0, time.UTC) // m normalized
	return caltime.MonthStart(month.Year(), month.Month(), loc), end, month.Format("2006-01")
}

// quotaGrace is how long a month's quota counter outlives the month in
// Redis.
const quotaGrace = 24 * time.Hour

// keyNames are a key's limit bucket names, the same on every call, and its
// quota month: made once per key (and month) rather than on every call.
type keyNames struct {
	account string
	env     schemas.Environment
	// buckets is CallLimits.Buckets for the key: shared, read-only.
	buckets []string
	month   atomic.Pointer[quotaMonth]
	// slot is the limiter's for the key's calls (CallLimits.Slot).
	slot LimitSlot
}

// quotaMonth is the quota period in force for a key in one time zone.
type quotaMonth struct {
	loc        *time.Location
	start, end time.Time
	bucket     string
}

// monthOf is the key's quota month at now in loc, made when the month (or
// the zone) changes.
func (n *keyNames) monthOf(prefix string, k *Key, now time.Time, loc *time.Location) *quotaMonth {
	if m := n.month.Load(); m != nil && m.loc == loc && !now.Before(m.start) && now.Before(m.end) {
		return m
	}
	start, end, suffix := quotaPeriod(now, loc)
	m := &quotaMonth{loc: loc, start: start, end: end,
		bucket: prefix + "quota:" + k.AccountID + ":" + string(k.Environment) + ":" + suffix}
	n.month.Store(m)
	return m
}

// limitNamesCache holds keyNames by key ID. A key's account and
// environment never change, so an entry is not expected to go stale; one
// that names another account or environment is made again all the same.
// The cache is cleared when it reaches maxKeyNames, against keys that come
// and go.
type limitNamesCache struct {
	byID sync.Map // key ID → *keyNames
	n    atomic.Int64
}

const maxKeyNames = 100_000

func (c *limitNamesCache) get(prefix string, k *Key) *keyNames {
	if v, ok := c.byID.Load(k.ID); ok {
		if n := v.(*keyNames); n.account == k.AccountID && n.env == k.Environment {
			return n
		}
	}
	if c.n.Add(1) > maxKeyNames {
		c.byID.Clear()
		c.n.Store(1)
	}
	n := &keyNames{account: k.AccountID, env: k.Environment, buckets: []string{
		prefix + "rl:key:" + k.ID,
		prefix + "rl:acct:" + k.AccountID + ":" + string(k.Environment),
	}}
	c.byID.Store(k.ID, n)
	return n
}

// limitState is what the headers of one response say.
type limitState struct {
	name   string
	result RateResult
	rps    int
}

func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64(math.Ceil(d.Seconds()))
}

// IsEdgeHeader reports whether an upstream's answer header is one the edge
// sets itself, so the upstream's copy is dropped: the rate-limit headers
// (isRateLimitHeader) and Request-Id, which names the call and its event
// (an upstream that echoes the one it was sent, or sets its own, would
// give the caller two, and fetch's headers.get reads them joined).
func IsEdgeHeader(name string) bool {
	return len(name) == len(HeaderRequestID) && strings.EqualFold(name, HeaderRequestID) || isRateLimitHeader(name)
}

// KeepsResponseTrailer reports whether an upstream's response trailer
// named name is passed on to the caller. The edge's own headers are not
// (IsEdgeHeader; with cors, the Access-Control-* ones too): a trailer that
// named another Request-Id or limit would contradict the head the edge
// sent. Nor are fields that describe one connection or the framing, which
// end at the edge as they do in the head.
func KeepsResponseTrailer(name string, cors bool) bool {
	if IsEdgeHeader(name) || cors && IsCORSHeader(name) {
		return false
	}
	for _, h := range [...]string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length"} {
		if strings.EqualFold(name, h) {
			return false
		}
	}
	return true
}

// isRateLimitHeader reports whether an upstream's answer header is one of
// the rate-limit headers the edge sets (setRateHeaders): the edge's own, on
// every proxied answer. An upstream with a limiter of its own (many web
// frameworks send RateLimit by default) would otherwise add a second value
// beside the edge's, naming a limit the edge does not enforce, or one a
// proxy in between folds into "1999, 99999", which no client can read.
func isRateLimitHeader(name string) bool {
	switch len(name) {
	case len("RateLimit"):
		return strings.EqualFold(name, "RateLimit")
	case len("RateLimit-Policy"):
		return strings.EqualFold(name, "RateLimit-Policy")
	case len("X-RateLimit-Limit"): // and X-RateLimit-Reset
		return strings.EqualFold(name, "X-RateLimit-Limit") || strings.EqualFold(name, "X-RateLimit-Reset")
	case len("X-RateLimit-Remaining"):
		return strings.EqualFold(name, "X-RateLimit-Remaining")
	}
	return false
}

// setRateHeaders writes the X-RateLimit-* headers and the IETF draft
// RateLimit / RateLimit-Policy fields for the tightest of the limits, the
// monthly quota among them. For a rate limit, Limit is the burst, Reset the
// seconds until the bucket is full again; for the quota, Limit is the
// month's requests and Reset the seconds until the next month starts;
// the policy window w is the time a full burst takes to refill. set must
// copy the value: the values share one buffer.
func setRateHeaders(set func(name string, value []byte), states []limitState, quota *quotaState) {
	if len(states) == 0 {
		return
	}
	tight := states[0]
	for _, s := range states[1:] {
		if s.result.Remaining < tight.result.Remaining {
			tight = s
		}
	}
	// The tightest limit, the monthly quota included: a caller with more
	// burst left than quota is told about the quota, which refuses it first;
	// and so is one with none of either left, since the burst refills
	// within seconds and the quota only at the month's end (named the
	// burst, the last call of a month told its caller to come back in
	// seconds, into quota_exceeded).
	name, limit, remaining := tight.name, int64(tight.result.Limit), int64(tight.result.Remaining)
	reset := ceilSeconds(tight.result.ResetAfter)
	if quota != nil {
		if left := max(0, quota.limit-quota.used); left < remaining || left == 0 {
			name, limit, remaining, reset = "monthly", quota.limit, left, ceilSeconds(quota.resetIn)
		}
	}
	// Built with appends into one buffer rather than fmt and strings: this
	// runs on every call.
	var buf [256]byte
	b := buf[:0]
	// Names in Go's canonical form, so net/http's header map can take
	// them as they are.
	b = strconv.AppendInt(b, limit, 10)
	set("X-Ratelimit-Limit", b)
	n := len(b)
	b = strconv.AppendInt(b, remaining, 10)
	set("X-Ratelimit-Remaining", b[n:])
	n = len(b)
	b = strconv.AppendInt(b, reset, 10)
	set("X-Ratelimit-Reset", b[n:])
	n = len(b)
	for i, s := range states {
		if i > 0 {
			b = append(b, ", "...)
		}
		rps := float64(max(1, s.rps))
		if s.result.Rate > 0 {
			rps = s.result.Rate
		}
		w := max(1, int(math.Ceil(float64(s.result.Limit)/rps)))
		b = appendPolicy(b, s.name, int64(s.result.Limit), int64(w))
	}
	if quota != nil {
		b = append(b, ", "...)
		b = appendPolicy(b, "monthly", quota.limit, ceilSeconds(quota.window))
	}
	set("Ratelimit-Policy", b[n:])
	n = len(b)
	b = appendName(b, name)
	b = append(b, ";r="...)
	b = strconv.AppendInt(b, remaining, 10)
	b = append(b, ";t="...)
	b = strconv.AppendInt(b, reset, 10)
	set("Ratelimit", b[n:])
}

// appendPolicy appends one RateLimit-Policy item: "name";q=quota;w=window.
func appendPolicy(b []byte, name string, quota, window int64) []byte {
	b = appendName(b, name)
	b = append(b, ";q="...)
	b = strconv.AppendInt(b, quota, 10)
	b = append(b, ";w="...)
	return strconv.AppendInt(b, window, 10)
}

// appendName appends a limit's name as a quoted string. The names are the
// edge's own (limitNames and "monthly"), lower-case letters that need no
// escaping, so this is strconv.AppendQuote without its per-rune checks.
func appendName(b []byte, name string) []byte {
	b = append(b, '"')
	b = append(b, name...)
	return append(b, '"')
}

type quotaState struct {
	limit  int64
	used   int64
	reset  time.Time
	window time.Duration
	// resetIn is the time until the quota's count starts over: the rest
	// of the month (window), or, for a fallback's share, until the shared
	// count is asked again.
	resetIn time.Duration
}
