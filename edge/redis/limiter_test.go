package redis_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// Batching many concurrent calls must give the answers separate script
// runs would: here the quota admits exactly 60 of 300 calls.
func TestBatchedCallsAreExact(t *testing.T) {
	r := testenv.NewRedis(t)
	l := edgeredis.NewLimiter(r.Client)
	limits := edge.CallLimits{Buckets: []string{r.Prefix + "key", r.Prefix + "acct"}, RPS: 1000, Burst: 1000,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 60, QuotaTTL: time.Hour}
	const calls = 300
	var (
		mu      sync.Mutex
		allowed int
		wg      sync.WaitGroup
	)
	for range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := l.AllowCall(context.Background(), limits)
			if err != nil {
				t.Error(err)
				return
			}
			if len(res.Rates) != 2 || !res.Rates[0].Allowed || !res.Rates[1].Allowed || !res.QuotaChecked {
				t.Errorf("every bucket should allow and the quota be counted: %+v", res)
				return
			}
			if res.QuotaAllowed {
				mu.Lock()
				allowed++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if allowed != 60 {
		t.Fatalf("%d calls allowed under a quota of 60", allowed)
	}
	n, err := r.Client.Get(context.Background(), r.Prefix+"quota").Int()
	testenv.Must(t, err, "read quota counter")
	if n != 60 {
		t.Fatalf("quota counter %d, want 60 (refused calls must not count)", n)
	}
	runs, decided := l.Batched()
	leased, _ := l.Leased()
	if decided+leased != calls || runs == 0 || runs > decided {
		t.Fatalf("%d calls decided in %d script runs and %d from leases, want %d calls", decided, runs, leased, calls)
	}
	t.Logf("%d calls in %d script runs, %d from leases", decided, runs, leased)
}

// After Redis forgets its scripts (a restart, SCRIPT FLUSH), calls reload
// the script instead of failing.
func TestBatchedCallsSurviveAScriptFlush(t *testing.T) {
	r := testenv.NewRedis(t)
	l := edgeredis.NewLimiter(r.Client)
	limits := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 10, Burst: 10, QuotaLimit: -1}
	ctx := context.Background()
	if _, err := l.AllowCall(ctx, limits); err != nil {
		t.Fatal(err)
	}
	testenv.Must(t, r.Client.ScriptFlush(ctx).Err(), "script flush")
	res, err := l.AllowCall(ctx, limits)
	if err != nil {
		t.Fatalf("after SCRIPT FLUSH: %v", err)
	}
	if len(res.Rates) != 1 || !res.Rates[0].Allowed || res.Rates[0].Remaining != 8 {
		t.Fatalf("second call: %+v, want allowed with 8 remaining", res)
	}
}

// Calls on different keys, limits and quotas, decided concurrently (and so
// in shared script runs), each get their own exact answer; a call whose
// key holds the wrong type fails alone.
func TestBatchedCallsKeepEachCallsOwnLimits(t *testing.T) {
	r := testenv.NewRedis(t)
	ctx := context.Background()
	l := edgeredis.NewLimiter(r.Client)
	// Rate buckets live under redis_rate's "rate:" prefix.
	testenv.Must(t, r.Client.RPush(ctx, "rate:"+r.Prefix+"broken", "x").Err(), "make a list key")
	t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"broken") })
	quotas := []int64{7, 19, 40}
	limits := make([]edge.CallLimits, len(quotas))
	for i, q := range quotas {
		id := string(rune('a' + i))
		limits[i] = edge.CallLimits{Buckets: []string{r.Prefix + "key:" + id, r.Prefix + "acct:" + id}, RPS: 1000, Burst: 1000,
			QuotaBucket: r.Prefix + "quota:" + id, QuotaLimit: q, QuotaTTL: time.Hour}
	}
	broken := edge.CallLimits{Buckets: []string{r.Prefix + "broken"}, RPS: 10, Burst: 10, QuotaLimit: -1}
	const perLimit = 60
	var (
		mu        sync.Mutex
		allowed   = make([]int64, len(quotas))
		maxUsed   = make([]int64, len(quotas))
		brokenErr int
		wg        sync.WaitGroup
	)
	for n := range perLimit {
		for i := range limits {
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := l.AllowCall(ctx, limits[i])
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if res.QuotaAllowed {
					allowed[i]++
				}
				maxUsed[i] = max(maxUsed[i], res.QuotaUsed)
			}()
		}
		if n%10 == 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := l.AllowCall(ctx, broken); err != nil {
					mu.Lock()
					brokenErr++
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	for i, q := range quotas {
		if allowed[i] != q || maxUsed[i] != q {
			t.Errorf("limit %d: %d calls allowed, highest count %d; want %d and %d", i, allowed[i], maxUsed[i], q, q)
		}
		n, err := r.Client.Get(ctx, limits[i].QuotaBucket).Int64()
		testenv.Must(t, err, "read quota counter")
		if n != q {
			t.Errorf("limit %d: quota counter %d, want %d", i, n, q)
		}
	}
	if brokenErr != perLimit/10 {
		t.Errorf("%d of %d calls on a list key failed, want all", brokenErr, perLimit/10)
	}
	runs, calls := l.Batched()
	t.Logf("%d calls in %d script runs", calls, runs)
}

// AllowCall's script keeps redis_rate's arithmetic: the same run of calls
// through AllowCall and through redis_rate (Allow) on a twin bucket gets
// the same answers, refusals included.
func TestAllowCallAgreesWithRedisRate(t *testing.T) {
	r := testenv.NewRedis(t)
	ctx := context.Background()
	l := edgeredis.NewLimiter(r.Client)
	t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"script", "rate:"+r.Prefix+"library") })
	// At one call a second the answers cannot drift between the twins
	// while the run lasts well under a second.
	const rps, burst = 1, 5
	for i := range burst + 3 {
		got, err := l.AllowCall(ctx, edge.CallLimits{Buckets: []string{r.Prefix + "script"}, RPS: rps, Burst: burst, QuotaLimit: -1})
		testenv.Must(t, err, "AllowCall")
		want, err := l.Allow(ctx, r.Prefix+"library", rps, burst)
		testenv.Must(t, err, "Allow")
		g := got.Rates[0]
		if g.Allowed != want.Allowed || g.Remaining != want.Remaining || g.Limit != want.Limit {
			t.Fatalf("call %d: script %+v, redis_rate %+v", i, g, want)
		}
		for _, d := range [][2]time.Duration{{g.RetryAfter, want.RetryAfter}, {g.ResetAfter, want.ResetAfter}} {
			if diff := d[0] - d[1]; diff < -50*time.Millisecond || diff > 50*time.Millisecond {
				t.Fatalf("call %d: script %+v, redis_rate %+v", i, g, want)
			}
		}
		if i >= burst && g.Allowed {
			t.Fatalf("call %d allowed past a burst of %d", i, burst)
		}
	}
}

// Concurrent calls on one bucket share script runs, which hold the bucket
// between calls: still exactly the burst is allowed, and the bucket and
// the quota counter keep their expiries.
func TestBatchedCallsOnOneBucketAllowExactlyTheBurst(t *testing.T) {
	r := testenv.NewRedis(t)
	ctx := context.Background()
	l := edgeredis.NewLimiter(r.Client)
	bucket := "rate:" + r.Prefix + "hot"
	t.Cleanup(func() { r.Client.Del(context.Background(), bucket) })
	limits := edge.CallLimits{Buckets: []string{r.Prefix + "hot"}, RPS: 1, Burst: 25,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 1000, QuotaTTL: time.Hour}
	var (
		mu               sync.Mutex
		allowed, counted int
		wg               sync.WaitGroup
	)
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := l.AllowCall(ctx, limits)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if res.Rates[0].Allowed {
				allowed++
			}
			if res.QuotaChecked {
				counted++
			}
		}()
	}
	wg.Wait()
	if allowed != 25 || counted != 25 {
		t.Fatalf("%d calls allowed and %d counted against the quota, want 25 and 25", allowed, counted)
	}
	if n, err := r.Client.Get(ctx, limits.QuotaBucket).Int(); err != nil || n != 25 {
		t.Fatalf("quota counter %d (%v), want 25", n, err)
	}
	for _, k := range []string{bucket, limits.QuotaBucket} {
		ttl, err := r.Client.TTL(ctx, k).Result()
		testenv.Must(t, err, "TTL")
		if ttl <= 0 || ttl > time.Hour+time.Second {
			t.Fatalf("%s expires in %v", k, ttl)
		}
	}
	runs, calls := l.Batched()
	t.Logf("%d calls in %d script runs", calls, runs)
}

// A call whose stored state is unusable (a key of the wrong type) is decided
// locally on its own; the next call on sound keys still goes to Redis, where
// an unreachable Redis would have sent it to the local limiter too.
func TestOneBrokenKeyDoesNotTakeTheInstanceOffRedis(t *testing.T) {
	r := testenv.NewRedis(t)
	ctx := context.Background()
	testenv.Must(t, r.Client.RPush(ctx, "rate:"+r.Prefix+"broken", "x").Err(), "make a list key")
	t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"broken") })
	var fallbacks []error
	f := &edge.FallbackLimiter{Primary: edgeredis.NewLimiter(r.Client), Local: edge.NewLocalLimiter(1),
		OnFallback: func(_ string, err error) { fallbacks = append(fallbacks, err) }}

	broken := edge.CallLimits{Buckets: []string{r.Prefix + "broken"}, RPS: 10, Burst: 10, QuotaLimit: -1}
	res, err := f.AllowCall(ctx, broken)
	if err != nil || len(res.Rates) != 1 || !res.Rates[0].Allowed {
		t.Fatalf("the broken key's call: %+v %v, want decided locally and allowed", res, err)
	}
	if len(fallbacks) != 1 || !errors.Is(fallbacks[0], edge.ErrLimitState) {
		t.Fatalf("fallbacks reported: %v, want one ErrLimitState", fallbacks)
	}
	sound := edge.CallLimits{Buckets: []string{r.Prefix + "key:sound"}, RPS: 10, Burst: 10,
		QuotaBucket: r.Prefix + "quota:sound", QuotaLimit: 100, QuotaTTL: time.Hour}
	for range 3 {
		if _, err := f.AllowCall(ctx, sound); err != nil {
			t.Fatal(err)
		}
	}
	n, err := r.Client.Get(ctx, r.Prefix+"quota:sound").Int()
	if err != nil || n != 3 {
		t.Fatalf("quota counter in Redis: %d %v, want 3 (the sound calls went to Redis)", n, err)
	}
	if len(fallbacks) != 1 {
		t.Errorf("%d fallbacks, want only the broken key's", len(fallbacks))
	}
}

// A refused call charges nothing, so the buckets that would have allowed
// it report the tokens they still hold, not one fewer: whether the quota
// or another bucket refused it.
func TestARefusedCallReportsTheBucketsUncharged(t *testing.T) {
	r := testenv.NewRedis(t)
	ctx := context.Background()
	l := edgeredis.NewLimiter(r.Client)
	call := func(c edge.CallLimits) edge.CallResult {
		t.Helper()
		res, err := l.AllowCall(ctx, c)
		testenv.Must(t, err, "allow call")
		return res
	}
	t.Run("refused by the quota", func(t *testing.T) {
		limits := edge.CallLimits{Buckets: []string{r.Prefix + "key", r.Prefix + "acct"}, RPS: 1, Burst: 10,
			QuotaBucket: r.Prefix + "quota", QuotaLimit: 3, QuotaTTL: time.Hour}
		var last edge.CallResult
		for range 3 {
			last = call(limits)
		}
		if !last.QuotaAllowed || last.Rates[0].Remaining < 7 {
			t.Fatalf("third call: %+v, want allowed with 7 tokens left", last)
		}
		for range 2 {
			res := call(limits)
			if res.QuotaAllowed || len(res.Rates) != 2 {
				t.Fatalf("call past the quota: %+v, want refused by the quota", res)
			}
			for i, b := range res.Rates {
				// At least: a stalled second would refill one more.
				if !b.Allowed || b.Remaining < 7 {
					t.Errorf("bucket %d of a call the quota refused: %+v, want 7 tokens left, as before it", i, b)
				}
			}
		}
	})
	t.Run("refused by another bucket", func(t *testing.T) {
		a := edge.CallLimits{Buckets: []string{r.Prefix + "key:a", r.Prefix + "acct:shared"}, RPS: 1, Burst: 3, QuotaLimit: -1}
		b := edge.CallLimits{Buckets: []string{r.Prefix + "key:b", r.Prefix + "acct:shared"}, RPS: 1, Burst: 3, QuotaLimit: -1}
		for range 3 {
			call(a) // drains the shared account bucket
		}
		res := call(b)
		if len(res.Rates) != 2 || res.Rates[1].Allowed {
			t.Fatalf("call on a drained account bucket: %+v, want refused by it", res)
		}
		if k := res.Rates[0]; !k.Allowed || k.Remaining != 3 {
			t.Errorf("key bucket of a call its account bucket refused: %+v, want all 3 tokens left", k)
		}
	})
}
