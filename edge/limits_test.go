package edge

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// TestLimitNamesNeedNoEscaping: the rate-limit headers quote limit names
// without escaping them, which holds only while every name is plain.
func TestLimitNamesNeedNoEscaping(t *testing.T) {
	for _, name := range append(limitNames[:], "monthly") {
		if got, want := string(appendName(nil, name)), strconv.Quote(name); got != want {
			t.Errorf("limit name %q is written %s, want %s", name, got, want)
		}
	}
}

func TestQuotaMonthWhoseFirstMidnightNeverHappened(t *testing.T) {
	asuncion, err := time.LoadLocation("America/Asuncion")
	if err != nil {
		t.Fatal(err)
	}
	// Clocks jumped from 00:00 to 01:00 on 1 October 2023 in Asuncion. A
	// call in October counts against October's bucket, and the month ends
	// on 1 November, not an hour into 30 October.
	for _, at := range []time.Time{
		time.Date(2023, 10, 1, 4, 0, 0, 0, time.UTC),   // the first instant of October there
		time.Date(2023, 10, 31, 2, 30, 0, 0, time.UTC), // 30 October, 23:30 local
	} {
		start, end, suffix := quotaPeriod(at, asuncion)
		if suffix != "2023-10" {
			t.Errorf("at %s: bucket suffix %q, want 2023-10", at, suffix)
		}
		if want := time.Date(2023, 10, 1, 4, 0, 0, 0, time.UTC); !start.Equal(want) {
			t.Errorf("at %s: start %s, want %s", at, start.UTC(), want)
		}
		if want := time.Date(2023, 11, 1, 3, 0, 0, 0, time.UTC); !end.Equal(want) {
			t.Errorf("at %s: end %s, want %s", at, end.UTC(), want)
		}
	}
}

func TestQuotaMonthWhoseFirstMidnightHappenedTwice(t *testing.T) {
	stJohns, err := time.LoadLocation("America/St_Johns")
	if err != nil {
		t.Fatal(err)
	}
	// Clocks fell back from 00:01 on 1 November 2009 to 23:01 on 31
	// October in St. John's: November began at the first midnight (02:30
	// UTC), and the hour after 03:01 UTC reads as 31 October again. It is
	// November's all the same, and the month does not end before it.
	start, end, suffix := quotaPeriod(time.Date(2009, 11, 1, 3, 1, 0, 0, time.UTC), stJohns)
	if want := time.Date(2009, 11, 1, 2, 30, 0, 0, time.UTC); suffix != "2009-11" || !start.Equal(want) {
		t.Errorf("bucket suffix %q from %s, want 2009-11 from %s", suffix, start.UTC(), want)
	}
	if want := time.Date(2009, 12, 1, 3, 30, 0, 0, time.UTC); !end.Equal(want) {
		t.Errorf("end %s, want %s", end.UTC(), want)
	}
	// A December in the same way rolls the year over.
	_, end, suffix = quotaPeriod(time.Date(2009, 12, 31, 12, 0, 0, 0, time.UTC), stJohns)
	if want := time.Date(2010, 1, 1, 3, 30, 0, 0, time.UTC); suffix != "2009-12" || !end.Equal(want) {
		t.Errorf("31 December 2009: suffix %q, end %s; want 2009-12, %s", suffix, end.UTC(), want)
	}
}

// On the local fallback each instance has its share of the plan's burst
// and rate; RateLimit-Policy's window is that share's, not the plan's.
func TestPolicyWindowOnTheLocalFallbackIsTheShares(t *testing.T) {
	l := NewLocalLimiter(4)
	res, err := l.Allow(context.Background(), "k", 100, 200) // 25 a second, bursts of 50, per instance
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	setRateHeaders(func(name string, v []byte) { got[name] = string(v) },
		[]limitState{{name: "key", result: res, rps: 100}}, nil)
	if got["X-Ratelimit-Limit"] != "50" || got["Ratelimit-Policy"] != `"key";q=50;w=2` {
		t.Errorf("headers %v, want a limit of 50 and the policy \"key\";q=50;w=2", got)
	}
}

// The local fallback gives each instance its exact part of the plan's
// rate, a fraction where the instances do not divide it, so the fleet's
// rate is the plan's: rounded down to whole calls (at least one), 5 a
// second over 10 instances let the fleet make 10, and over 3 instances 3.
// The burst is rounded up to whole calls.
func TestTheLocalFallbacksRateIsTheExactShare(t *testing.T) {
	for _, c := range []struct{ rps, burst, instances, wantBurst int }{
		{5, 10, 10, 1}, {5, 10, 3, 4}, {5, 10, 4, 3}, {1, 2, 2, 1}, {100, 200, 4, 50},
	} {
		l := NewLocalLimiter(c.instances)
		res, err := l.AllowCall(context.Background(), CallLimits{Buckets: []string{"k"}, RPS: c.rps, Burst: c.burst})
		if err != nil {
			t.Fatal(err)
		}
		r := res.Rates[0]
		if fleet := r.Rate * float64(c.instances); math.Abs(fleet-float64(c.rps)) > 1e-9 || r.Limit != c.wantBurst {
			t.Errorf("%d/s, burst %d over %d instances: each at %g/s (the fleet %g/s), burst %d; want the fleet at %d/s, burst %d each",
				c.rps, c.burst, c.instances, r.Rate, fleet, r.Limit, c.rps, c.wantBurst)
		}
		// The bucket refills at that rate: empty, it gives its next call
		// after 1/rate seconds.
		for res.Rates[0].Allowed {
			res, _ = l.AllowCall(context.Background(), CallLimits{Buckets: []string{"k"}, RPS: c.rps, Burst: c.burst})
		}
		if want := time.Duration(float64(time.Second) * float64(c.instances) / float64(c.rps)); res.Rates[0].RetryAfter > want || res.Rates[0].RetryAfter < want-50*time.Millisecond {
			t.Errorf("%d/s over %d instances: retry after %s when empty, want about %s", c.rps, c.instances, res.Rates[0].RetryAfter, want)
		}
	}
}

// The local fallback decides a call as the Redis script does: a call that
// one bucket or the quota refuses charges no bucket (step by step, the
// buckets before the refusal had each spent a token).
func TestLocalFallbackChargesNothingForARefusedCall(t *testing.T) {
	ctx := context.Background()
	call := func(l *LocalLimiter, c CallLimits) CallResult {
		t.Helper()
		res, err := l.AllowCall(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	t.Run("refused by the quota", func(t *testing.T) {
		l := NewLocalLimiter(1)
		c := CallLimits{Buckets: []string{"key", "acct"}, RPS: 1, Burst: 10, QuotaBucket: "q", QuotaLimit: 3}
		for i := range 3 {
			if res := call(l, c); !res.QuotaAllowed || res.QuotaUsed != int64(i+1) || !res.Rates[0].Allowed || !res.Rates[1].Allowed {
				t.Fatalf("call %d within every limit: %+v, want allowed", i+1, res)
			}
		}
		for range 2 {
			res := call(l, c)
			if !res.QuotaChecked || res.QuotaAllowed || res.QuotaUsed != 3 || len(res.Rates) != 2 {
				t.Fatalf("call past the quota: %+v, want refused by it with 3 used", res)
			}
			for i, b := range res.Rates {
				if !b.Allowed || b.Remaining < 7 {
					t.Errorf("bucket %d of a call the quota refused: %+v, want 7 tokens left, as before it", i, b)
				}
			}
		}
	})
	t.Run("refused by another bucket", func(t *testing.T) {
		l := NewLocalLimiter(1)
		a := CallLimits{Buckets: []string{"key:a", "acct"}, RPS: 1, Burst: 3, QuotaBucket: "q", QuotaLimit: -1}
		b := CallLimits{Buckets: []string{"key:b", "acct"}, RPS: 1, Burst: 3, QuotaBucket: "q", QuotaLimit: -1}
		for range 3 {
			call(l, a) // drains the shared account bucket
		}
		res := call(l, b)
		if len(res.Rates) != 2 || res.Rates[1].Allowed || res.Rates[1].RetryAfter <= 0 || res.QuotaChecked {
			t.Fatalf("call on a drained account bucket: %+v, want refused by it, with a wait, before the quota", res)
		}
		if k := res.Rates[0]; !k.Allowed || k.Remaining != 3 {
			t.Errorf("key bucket of a call its account bucket refused: %+v, want all 3 tokens left", k)
		}
		if res := call(l, CallLimits{Buckets: []string{"key:b"}, RPS: 1, Burst: 3, QuotaLimit: -1}); res.Rates[0].Remaining != 2 {
			t.Errorf("key bucket after one allowed call: %+v, want 2 tokens left (the refused call took none)", res.Rates[0])
		}
	})
}

// countingPrimary stands in for Redis's quota counting (the Redis limiter
// itself is tested against Redis in edge/redis): it counts each bucket's
// calls up to the limit, and fails every call while down.
type countingPrimary struct {
	mu    sync.Mutex
	down  bool
	count map[string]int64
	// afterAdd, when set, runs once right after an AddQuota has counted.
	afterAdd func()
	// last is the last batch number counted per bucket and sender, as
	// Redis keeps it; loseReplies is how many adds next count but answer
	// with an error, as an add whose reply was lost.
	last        map[string]uint64
	loseReplies int
	// failAdds is how many adds next fail without counting.
	failAdds int
}

var errPrimaryDown = errors.New("primary down")

func (p *countingPrimary) Allow(context.Context, string, int, int) (RateResult, error) {
	return RateResult{Allowed: true, Limit: 1000, Remaining: 1000}, nil
}

func (p *countingPrimary) Take(_ context.Context, bucket string, limit int64, _ time.Duration) (int64, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return 0, false, errPrimaryDown
	}
	if n := p.count[bucket]; limit >= 0 && n >= limit {
		return n, false, nil
	}
	p.count[bucket]++
	return p.count[bucket], true, nil
}

func (p *countingPrimary) AllowCall(ctx context.Context, c CallLimits) (CallResult, error) {
	used, ok, err := p.Take(ctx, c.QuotaBucket, c.QuotaLimit, c.QuotaTTL)
	if err != nil {
		return CallResult{}, err
	}
	return CallResult{Rates: []RateResult{{Allowed: true, Limit: 1000, Remaining: 1000}}, QuotaChecked: true, QuotaUsed: used, QuotaAllowed: ok}, nil
}

var errReplyLost = errors.New("reply lost")

func (p *countingPrimary) AddQuota(_ context.Context, bucket, sender string, seq uint64, n int64, _ time.Duration) (int64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return 0, errPrimaryDown
	}
	if p.failAdds > 0 {
		p.failAdds--
		return 0, errPrimaryDown
	}
	if p.last == nil {
		p.last = map[string]uint64{}
	}
	if k := bucket + "/" + sender; seq > p.last[k] {
		p.last[k] = seq
		p.count[bucket] += n
	}
	if p.loseReplies > 0 {
		p.loseReplies--
		return 0, errReplyLost
	}
	if p.afterAdd != nil {
		p.mu.Unlock()
		p.afterAdd()
		p.afterAdd = nil
		p.mu.Lock()
	}
	return p.count[bucket], nil
}

// allowCalls makes n calls through f and returns how many the quota allowed.
func allowCalls(t *testing.T, f *FallbackLimiter, c CallLimits, n int) (allowed int) {
	t.Helper()
	for range n {
		res, err := f.AllowCall(context.Background(), c)
		if err != nil {
			t.Fatal(err)
		}
		if res.QuotaAllowed {
			allowed++
		}
	}
	return allowed
}

func (p *countingPrimary) set(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

// While Redis is down the local fallback counts a month's quota on from
// what Redis last reported, and what it allows is added to Redis's count
// when Redis answers again. Before, it started from zero (an account that
// had used its whole month got a whole month more per instance) and Redis
// never heard of those calls.
func TestTheQuotaFallbackCountsOnFromRedisAndPaysItBack(t *testing.T) {
	for _, instances := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d instances", instances), func(t *testing.T) {
			p := &countingPrimary{count: map[string]int64{}}
			f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(instances), Cooldown: time.Millisecond}
			c := CallLimits{Buckets: []string{"key"}, RPS: 1000, Burst: 1000, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
			calls := func(n int) int { return allowCalls(t, f, c, n) }
			if got := calls(600); got != 600 {
				t.Fatalf("Redis up: %d of 600 allowed", got)
			}
			p.set(true)
			// This instance's part of the 400 left: 400 / instances.
			if got, want := calls(1000), 400/instances; got != want {
				t.Fatalf("Redis down after 600 of 1,000 were used: %d allowed here, want %d", got, want)
			}
			p.set(false)
			time.Sleep(5 * time.Millisecond) // the cooldown
			calls(1)                         // Redis answers: what was owed goes
			deadline := time.Now().Add(5 * time.Second)
			for {
				p.mu.Lock()
				n := p.count[c.QuotaBucket]
				p.mu.Unlock()
				if n >= int64(600+400/instances) {
					if want := int64(601 + 400/instances); n != want {
						t.Fatalf("Redis's count %d, want %d: the 600, the fallback's %d and the call that found it back", n, want, 400/instances)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("Redis's count %d: the fallback's calls were never added", n)
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
}

// A call Redis answers between the add of what the fallback owed and the
// fallback's note of it already counts the owed calls: the fallback must
// not count them a second time, or the next outage starts from a count
// above Redis's and refuses calls the account has not made.
func TestASettleCountsTheOwedCallsOnce(t *testing.T) {
	ctx := context.Background()
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Millisecond}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1000, Burst: 1000, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
	calls := func(n int) int { return allowCalls(t, f, c, n) }
	calls(600)
	p.set(true)
	calls(100) // allowed locally, owed
	p.set(false)
	time.Sleep(5 * time.Millisecond) // the cooldown
	answered := make(chan struct{})
	p.mu.Lock()
	p.afterAdd = func() { calls(1); close(answered) } // answered by Redis mid-settle
	p.mu.Unlock()
	calls(1) // Redis answers: the settle starts
	<-answered
	testenv.Must(t, f.Settle(ctx), "settle") // waits for the one running
	p.mu.Lock()
	redis := p.count[c.QuotaBucket]
	p.mu.Unlock()
	if redis != 702 {
		t.Fatalf("Redis's count %d, want 702: 600, the 100 owed, and the two calls since", redis)
	}
	p.set(true)
	time.Sleep(5 * time.Millisecond)
	if got := calls(1000); got != int(1000-redis) {
		t.Fatalf("second outage: %d allowed locally, want %d (what Redis's count leaves)", got, 1000-redis)
	}
}

// A graceful stop settles what the fallback owes even when no call came
// after Redis did.
func TestSettlePaysWhatIsOwedWithoutACall(t *testing.T) {
	ctx := context.Background()
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Millisecond}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1000, Burst: 1000, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
	p.set(true)
	for range 40 {
		if _, err := f.AllowCall(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Settle(ctx); err == nil {
		t.Fatal("a settle while Redis is down succeeded")
	}
	p.set(false)
	testenv.Must(t, f.Settle(ctx), "settle once Redis is back")
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := p.count[c.QuotaBucket]; n != 40 {
		t.Fatalf("Redis's count %d after the stop's settle, want the 40 allowed locally", n)
	}
}

// A settle whose reply is lost may have been counted: it is sent again
// under the same batch name, which the primary counts once. Before, the
// retry added the outage's calls a second time (and once more per reply
// lost), and the account met its monthly quota early.
func TestASettleWhoseReplyIsLostCountsItsCallsOnce(t *testing.T) {
	ctx := context.Background()
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Millisecond}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1000, Burst: 1000, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
	calls := func(n int) int { return allowCalls(t, f, c, n) }
	calls(1)
	p.set(true)
	calls(5) // allowed locally, owed
	p.set(false)
	p.mu.Lock()
	p.loseReplies = 2
	p.mu.Unlock()
	for range 2 {
		if err := f.Settle(ctx); !errors.Is(err, errReplyLost) {
			t.Fatalf("settle with its reply lost: %v, want the lost reply", err)
		}
	}
	p.set(true)
	time.Sleep(5 * time.Millisecond)
	calls(3) // a second batch, owed beside the first
	p.set(false)
	testenv.Must(t, f.Settle(ctx), "settle")
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := p.count[c.QuotaBucket]; n != 9 {
		t.Fatalf("Redis's count %d, want 9: one call, 5 and then 3 allowed locally, each once", n)
	}
}

// A second outage counts on from Redis's count and what is still owed,
// not from the local count the first left: those calls were paid back, so
// counting them again refused calls the month had left.
func TestASecondOutageCountsOnlyWhatIsStillOwed(t *testing.T) {
	ctx := context.Background()
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(2), Cooldown: time.Millisecond}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1 << 20, Burst: 1 << 20, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
	calls := func(n int) int { return allowCalls(t, f, c, n) }
	calls(1)
	p.set(true) // a burst that outlasts both outages: only the quota refuses
	if got := calls(1000); got != 499 {
		t.Fatalf("first outage: %d allowed, want 499 (this instance's 500, less its part of the one call)", got)
	}
	p.set(false)
	testenv.Must(t, f.Settle(ctx), "settle")
	time.Sleep(5 * time.Millisecond)
	calls(100)
	p.set(true)
	time.Sleep(5 * time.Millisecond)
	if got := calls(1000); got != 200 {
		t.Fatalf("second outage, 600 of 1,000 used: %d allowed, want 200, this instance's part of the 400 left", got)
	}
}

// A bucket whose calls cannot be recorded as owed (the owed table is full)
// still has its local count grow to the instance's share: set from what
// is owed, which holds none of its calls, it was set back before every
// call, and the outage allowed every call.
func TestABucketTheOwedTableCannotHoldStillMeetsItsShare(t *testing.T) {
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Hour}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1 << 20, Burst: 1 << 20, QuotaBucket: "q:2026-03", QuotaLimit: 100, QuotaTTL: time.Hour}
	allowCalls(t, f, c, 1)
	f.owed = map[string]owedCalls{}
	for i := range maxLocalBuckets {
		f.owed[fmt.Sprintf("other:%d", i)] = owedCalls{n: 1, ttl: time.Hour}
	}
	p.set(true)
	if got := allowCalls(t, f, c, 1000); got != 99 {
		t.Fatalf("outage with the owed table full: %d of 1,000 allowed, want the 99 the quota had left", got)
	}
}

// A bucket's batches are sent in order, and none after one that failed:
// the primary takes a batch only if its number is above the last it took,
// so a later batch taken first would have the earlier one's calls dropped.
func TestABucketsBatchesWaitBehindOneThatFailed(t *testing.T) {
	ctx := context.Background()
	p := &countingPrimary{count: map[string]int64{}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Millisecond}
	c := CallLimits{Buckets: []string{"key"}, RPS: 1 << 20, Burst: 1 << 20, QuotaBucket: "q:2026-03", QuotaLimit: 1000, QuotaTTL: time.Hour}
	calls := func(n int) int { return allowCalls(t, f, c, n) }
	outage := func(n int) {
		p.set(true)
		time.Sleep(5 * time.Millisecond)
		calls(n)
		p.set(false)
	}
	failNext := func() {
		p.mu.Lock()
		p.failAdds = 1
		p.mu.Unlock()
		if err := f.Settle(ctx); err == nil {
			t.Fatal("a settle whose add failed succeeded")
		}
	}
	calls(1)
	outage(5)
	failNext() // the first batch stays to be sent
	outage(3)
	failNext() // the first fails again: the second must wait behind it
	testenv.Must(t, f.Settle(ctx), "settle")
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := p.count[c.QuotaBucket]; n != 9 {
		t.Fatalf("Redis's count %d, want 9: one call, then 5 and 3 allowed locally", n)
	}
}

// stateBrokenPrimary answers calls of the key bucket "broken" that its
// state is unusable, and every other call that it is down, once warm is
// over; before, it answers them all.
type stateBrokenPrimary struct {
	countingPrimary
	failing atomic.Bool
}

func (p *stateBrokenPrimary) AllowCall(ctx context.Context, c CallLimits) (CallResult, error) {
	if !p.failing.Load() {
		return p.countingPrimary.AllowCall(ctx, c)
	}
	if c.Buckets[0] == "broken" {
		return CallResult{}, fmt.Errorf("%w: WRONGTYPE", ErrLimitState)
	}
	return CallResult{}, errPrimaryDown
}

// Calls of a key whose Redis state is broken (decided locally, owing
// nothing) and calls that fell back because Redis failed (owing what they
// allow) share the account's quota bucket: the first read what the second
// wrote without its lock, and Go ends the process on a map read during a
// write. Run with -race to see it every time; without, the runtime's own
// check catches it on most runs.
func TestCallsOwingNothingAndCallsOwingShareTheFallbackSafely(t *testing.T) {
	p := &stateBrokenPrimary{countingPrimary: countingPrimary{count: map[string]int64{}}}
	f := &FallbackLimiter{Primary: p, Local: NewLocalLimiter(1), Cooldown: time.Nanosecond}
	call := func(key string) CallLimits {
		return CallLimits{Buckets: []string{key}, RPS: 1e9, Burst: 1e9, QuotaBucket: "q:acct:2026-03", QuotaLimit: 1e12, QuotaTTL: time.Hour}
	}
	for _, k := range []string{"broken", "fine"} { // the quota bucket is seen
		if _, err := f.AllowCall(context.Background(), call(k)); err != nil {
			t.Fatal(err)
		}
	}
	p.failing.Store(true)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := call([]string{"broken", "fine"}[g%2])
			for range 20_000 {
				if _, err := f.AllowCall(context.Background(), c); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// The call that takes both the burst's last token and the month's last
// call is told of the month, which will not come back in seconds as the
// burst does. Before, its headers named the burst, whose Reset sent a
// client that follows them back into quota_exceeded.
func TestTheMonthsLastCallWithAnEmptyBurstNamesTheMonth(t *testing.T) {
	got := map[string]string{}
	setRateHeaders(func(name string, v []byte) { got[name] = string(v) },
		[]limitState{{name: "key", result: RateResult{Allowed: true, Limit: 2, Remaining: 0, ResetAfter: 2 * time.Second}, rps: 1}},
		&quotaState{limit: 2, used: 2, window: 30 * 24 * time.Hour, resetIn: 12 * 24 * time.Hour})
	if got["X-Ratelimit-Limit"] != "2" || got["X-Ratelimit-Remaining"] != "0" || got["X-Ratelimit-Reset"] != strconv.Itoa(12*24*3600) {
		t.Errorf("headers %v; want the month's: Remaining 0, Reset in 12 days", got)
	}
}

// A monthly quota smaller than the fleet still gives each instance one
// call of it while Redis is out of reach, as a burst smaller than the
// fleet does. Before, the share was 0, and every call was refused for the
// whole outage, an account's first of the month included.
func TestATinyQuotasShareIsOneCall(t *testing.T) {
	l := NewLocalLimiter(10)
	for _, c := range []struct{ limit, want int64 }{{0, 0}, {1, 1}, {5, 1}, {10, 1}, {25, 2}, {1000, 100}} {
		if got := l.QuotaShare(c.limit); got != c.want {
			t.Errorf("a quota of %d over 10 instances: a share of %d, want %d", c.limit, got, c.want)
		}
	}
}
