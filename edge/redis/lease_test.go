package redis_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// burstOf sends n concurrent calls through each limiter in turn and
// counts the calls allowed.
func burstOf(t *testing.T, n int, c edge.CallLimits, limiters ...*edgeredis.Limiter) int {
	t.Helper()
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := limiters[i%len(limiters)].AllowCall(context.Background(), c)
			if err != nil {
				t.Error(err)
				return
			}
			ok := len(res.Rates) == len(c.Buckets) && res.Rates[len(res.Rates)-1].Allowed
			if c.QuotaBucket != "" {
				ok = ok && res.QuotaAllowed
			}
			if ok {
				allowed.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(allowed.Load())
}

// busyLimits sends 600 calls, in three bursts of 200 concurrent ones,
// through one limiter on one key bucket (burst 100,000) and a quota of
// 10,000.
func busyLimits(t *testing.T) (*testenv.Redis, *edgeredis.Limiter, edge.CallLimits) {
	t.Helper()
	r := testenv.NewRedis(t)
	l := edgeredis.NewLimiter(r.Client)
	c := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 1, Burst: 100_000,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 10_000, QuotaTTL: time.Hour}
	t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"key") })
	for range 3 {
		if got := burstOf(t, 200, c, l); got != 200 {
			t.Fatalf("%d of 200 calls allowed under a quota of 10,000", got)
		}
	}
	return r, l, c
}

func TestLeases(t *testing.T) {
	t.Run("busy limits are leased and unused tokens go back", func(t *testing.T) {
		r, l, c := busyLimits(t)
		leased, _ := l.Leased()
		if leased == 0 {
			t.Fatal("600 concurrent calls and none decided from a lease")
		}
		// Once every lease has expired, Redis counts exactly the calls made.
		time.Sleep(200 * time.Millisecond)
		n, err := r.Client.Get(context.Background(), c.QuotaBucket).Int()
		testenv.Must(t, err, "read quota counter")
		_, refunded := l.Leased()
		if n != 600 {
			t.Fatalf("quota counter %d after 600 calls (%d from leases, %d tokens given back), want 600", n, leased, refunded)
		}
		res, err := l.AllowCall(context.Background(), edge.CallLimits{Buckets: c.Buckets, RPS: c.RPS, Burst: c.Burst, QuotaLimit: -1})
		testenv.Must(t, err, "AllowCall")
		// 600 tokens used (and at most a second's refill at 1/s): the
		// bucket has 99,399 or 99,400 left after this call.
		if rem := res.Rates[0].Remaining; rem < 100_000-601 || rem > 100_000-600 {
			t.Fatalf("bucket has %d left after 601 calls, want 99,399 or 99,400 (tokens given back?)", rem)
		}
		t.Logf("%d of 600 calls from leases; %d tokens given back", leased, refunded)
	})

	t.Run("a graceful stop gives spare tokens back at once", func(t *testing.T) {
		r, l, c := busyLimits(t)
		testenv.Must(t, l.ReturnLeases(context.Background()), "ReturnLeases")
		n, err := r.Client.Get(context.Background(), c.QuotaBucket).Int()
		testenv.Must(t, err, "read quota counter")
		if n != 600 {
			t.Fatalf("quota counter %d right after 600 calls and ReturnLeases, want 600", n)
		}
	})

	t.Run("quiet limits go to Redis on every call", func(t *testing.T) {
		r := testenv.NewRedis(t)
		l := edgeredis.NewLimiter(r.Client)
		c := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 1, Burst: 1000, QuotaLimit: -1}
		t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"key") })
		for i := range 5 {
			res, err := l.AllowCall(context.Background(), c)
			testenv.Must(t, err, "AllowCall")
			if got := res.Rates[0].Remaining; got != 999-i {
				t.Fatalf("call %d: %d remaining, want %d", i, got, 999-i)
			}
			time.Sleep(45 * time.Millisecond)
		}
		if leased, _ := l.Leased(); leased != 0 {
			t.Fatalf("%d calls from leases at one call per 45 ms", leased)
		}
	})

	t.Run("instances sharing a limit never allow more than it", func(t *testing.T) {
		r := testenv.NewRedis(t)
		a, b := edgeredis.NewLimiter(r.Client), edgeredis.NewLimiter(r.Client)
		c := edge.CallLimits{Buckets: []string{r.Prefix + "key", r.Prefix + "acct"}, RPS: 1, Burst: 400,
			QuotaBucket: r.Prefix + "quota", QuotaLimit: 350, QuotaTTL: time.Hour}
		t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"key", "rate:"+r.Prefix+"acct") })
		start := time.Now()
		first := burstOf(t, 300, edge.CallLimits{Buckets: c.Buckets, RPS: c.RPS, Burst: c.Burst, QuotaLimit: -1}, a, b)
		if first != 300 {
			t.Fatalf("%d of the first 300 calls allowed with a burst of 400", first)
		}
		// The buckets hold 100 tokens (plus a refill a second); the quota
		// of 350 is untouched. Hammer both instances with more than that.
		second := burstOf(t, 800, c, a, b)
		elapsed := time.Since(start)
		ceiling := 100 + int(float64(c.RPS)*elapsed.Seconds()) + 1
		if second > ceiling {
			t.Fatalf("two instances allowed %d calls; the buckets held at most %d", second, ceiling)
		}
		// Leased tokens go back within the lease's life: the rest of the
		// buckets' tokens are then there for the taking.
		time.Sleep(200 * time.Millisecond)
		rest := burstOf(t, 200, c, a)
		total := second + rest
		if total < 100 || total > 100+int(float64(c.RPS)*time.Since(start).Seconds())+1 {
			t.Fatalf("%d + %d calls allowed from buckets holding 100 tokens", second, rest)
		}
		la, ra := a.Leased()
		lb, rb := b.Leased()
		t.Logf("allowed %d, then %d; from leases %d + %d; given back %d + %d", second, rest, la, lb, ra, rb)
	})
}

// TestSlotServesOnlyItsOwnLimits: a slot remembers the lease of the limits
// it last served, and a call with other limits through the same slot (a
// key whose plan or month changed) must not spend that lease's tokens.
func TestSlotServesOnlyItsOwnLimits(t *testing.T) {
	r := testenv.NewRedis(t)
	l := edgeredis.NewLimiter(r.Client)
	var slot edge.LimitSlot
	busy := edge.CallLimits{Buckets: []string{r.Prefix + "a"}, RPS: 1, Burst: 100_000,
		QuotaBucket: r.Prefix + "quota-a", QuotaLimit: 10_000, QuotaTTL: time.Hour, Slot: &slot}
	for range 3 {
		if got := burstOf(t, 200, busy, l); got != 200 {
			t.Fatalf("%d of 200 calls allowed under a quota of 10,000", got)
		}
	}
	if slot.Load() == nil {
		t.Fatal("the limiter kept nothing in the slot")
	}
	// The same slot, a new quota of 5: exactly 5 calls pass, however many
	// spare tokens the first limits' lease holds.
	other := busy
	other.QuotaBucket, other.QuotaLimit = r.Prefix+"quota-b", 5
	if got := burstOf(t, 40, other, l); got != 5 {
		t.Fatalf("%d of 40 calls allowed under a quota of 5 through a slot that held another quota's lease", got)
	}
	// And back: the first limits still have their quota's room.
	if got := burstOf(t, 50, busy, l); got != 50 {
		t.Fatalf("%d of 50 calls allowed back on the first limits", got)
	}
}

// A busy instance's leases take at most a quarter of what the month has
// left, so another instance's caller is not refused while most of the
// quota is unspent; and a refusal that comes while a lease may still hold
// spare calls says so (QuotaLeased), so the caller is told to come back
// in a second rather than at the month's end, until no lease is left.
func TestAQuotaRefusalWhileLeasesMayHoldCallsSaysSo(t *testing.T) {
	r := testenv.NewRedis(t)
	a, b := edgeredis.NewLimiter(r.Client), edgeredis.NewLimiter(r.Client)
	c := edge.CallLimits{Buckets: []string{r.Prefix + "key", r.Prefix + "acct"}, RPS: 1000, Burst: 1000,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 100, QuotaTTL: time.Hour}
	t.Cleanup(func() { r.Client.Del(context.Background(), "rate:"+r.Prefix+"key", "rate:"+r.Prefix+"acct") })
	ctx := context.Background()
	if got := burstOf(t, 60, c, a); got != 60 {
		t.Fatalf("%d of 60 calls allowed under a quota of 100", got)
	}
	counted, err := r.Client.Get(ctx, c.QuotaBucket).Int()
	testenv.Must(t, err, "read the quota counter")
	res, err := b.AllowCall(ctx, c)
	testenv.Must(t, err, "the other instance's call")
	if !res.QuotaAllowed {
		t.Fatalf("after 60 of 100 calls (the counter at %d, leases included) another instance's call was refused (used %d)", counted, res.QuotaUsed)
	}
	// Use the month up through the busy instance; its last leases were
	// granted moments ago.
	for burstOf(t, 20, c, a) > 0 {
	}
	res, err = b.AllowCall(ctx, c)
	testenv.Must(t, err, "a call with the quota used up")
	if res.QuotaAllowed || !res.QuotaLeased {
		t.Fatalf("a call just after leases used the quota up: allowed %v, leased %v; want refused, with leases said to be out", res.QuotaAllowed, res.QuotaLeased)
	}
	time.Sleep(1100 * time.Millisecond)
	res, err = b.AllowCall(ctx, c)
	testenv.Must(t, err, "a call a second later")
	if res.QuotaAllowed || res.QuotaLeased {
		t.Fatalf("a call a second after the last lease: allowed %v, leased %v; want refused for the month", res.QuotaAllowed, res.QuotaLeased)
	}
	n, err := r.Client.Get(ctx, c.QuotaBucket).Int()
	testenv.Must(t, err, "read the quota counter")
	if n != 100 {
		t.Fatalf("quota counter %d once every lease is back, want 100", n)
	}
}
