package redis_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// Unused lease tokens go back 50 ms after their grant. By then the bucket
// may have refilled them, and another instance taken the whole burst: a
// refund that moved the bucket back then would hand that instance calls the
// bucket never held. Instance A leases at 1,000/s (burst 2,000) and uses a
// few dozen tokens; instance B, on the same bucket with plain redis_rate,
// takes the whole burst 40 ms later; once A's lease has expired, B finds no
// more than the refill since its burst.
func TestRefundAfterRefillGivesNothingBack(t *testing.T) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	lim := redis_rate.Limit{Rate: 1000, Burst: 2000, Period: time.Second}
	tested := 0
	for attempt := 0; attempt < 5; attempt++ {
		id := r.Prefix + "k" + strconv.Itoa(attempt)
		t.Cleanup(func() { r.Client.Del(ctx, "rate:"+id) })
		c := edge.CallLimits{Buckets: []string{id}, RPS: lim.Rate, Burst: lim.Burst, QuotaLimit: -1}
		a := edgeredis.NewLimiter(r.Client)
		b := redis_rate.NewLimiter(r.Client)
		// A few busy bursts, so that A's calls ask for a lease.
		used := 0
		for range 3 {
			used += burstOf(t, 6, c, a)
			time.Sleep(2 * time.Millisecond)
		}
		granted := time.Now()
		// A's charges (its spare tokens included) refill in a few dozen ms
		// at 1 ms each: the bucket is full again before A's lease expires.
		time.Sleep(40*time.Millisecond - time.Since(granted))
		res, err := b.AllowN(ctx, id, lim, lim.Burst)
		testenv.Must(t, err, "AllowN")
		burstAt := time.Now()
		if res.Allowed != lim.Burst {
			t.Logf("attempt %d: bucket not yet full (%d allowed); again", attempt, res.Allowed)
			continue
		}
		tested++
		time.Sleep(150 * time.Millisecond) // A's lease expired and its tokens went back
		one, err := b.Allow(ctx, id, lim)
		testenv.Must(t, err, "Allow")
		refill := int(time.Since(burstAt).Seconds()*float64(lim.Rate)) + 1
		_, refunded := a.Leased()
		if left := one.Remaining + 1; left > refill {
			t.Fatalf("A used %d and gave %d back; after B took the burst the bucket holds %d, more than the %d it refilled since",
				used, refunded, left, refill)
		}
	}
	if tested == 0 {
		t.Fatal("the bucket was never full 40 ms after A's lease: the machine is too slow for this test")
	}
}

// A Redis that lost its data (a restart without persistence) while an
// instance held a lease starts the quota counter again; the lease's unused
// tokens must not come off the new count, which never held them.
func TestRefundAfterRedisLostTheGrantLeavesTheQuotaAlone(t *testing.T) {
	ctx := context.Background()
	inst := testenv.PrivateRedis(t)
	rdb := redis.NewClient(&redis.Options{Addr: inst.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	l := edgeredis.NewLimiter(rdb)
	c := edge.CallLimits{Buckets: []string{"key"}, RPS: 1, Burst: 100_000,
		QuotaBucket: "quota", QuotaLimit: 10_000, QuotaTTL: time.Hour}
	for range 3 {
		if got := burstOf(t, 200, c, l); got != 200 {
			t.Fatalf("%d of 200 calls allowed under a quota of 10,000", got)
		}
	}
	if leased, _ := l.Leased(); leased == 0 {
		t.Fatal("600 concurrent calls and none decided from a lease")
	}
	// Redis loses everything; another instance counts 20 calls.
	testenv.Must(t, rdb.FlushAll(ctx).Err(), "FLUSHALL")
	testenv.Must(t, rdb.Set(ctx, "quota", 20, time.Hour).Err(), "count 20 calls")
	time.Sleep(200 * time.Millisecond) // every lease has expired
	n, err := rdb.Get(ctx, "quota").Int()
	testenv.Must(t, err, "read quota counter")
	if n != 20 {
		t.Fatalf("quota counter %d after the leases expired, want the 20 calls counted since Redis lost its data", n)
	}
}
