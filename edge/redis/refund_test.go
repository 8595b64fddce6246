package redis_test

import (
	"context"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
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
	for attempt := 0; attempt < 20 && tested < 5; attempt++ {
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
		// Redis runs B's burst somewhere between sending it and its reply:
		// counting the refill from the send bounds it from above.
		burstAt := time.Now()
		res, err := b.AllowN(ctx, id, lim, lim.Burst)
		testenv.Must(t, err, "AllowN")
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
	// Redis loses everything; another instance counts 20 calls. (A lease
	// asked for ahead of need may still be on its way: granted by the
	// emptied Redis, it is counted there, recorded, and given back whole,
	// no call having used it.)
	testenv.Must(t, rdb.FlushAll(ctx).Err(), "FLUSHALL")
	testenv.Must(t, rdb.IncrBy(ctx, "quota", 20).Err(), "count 20 calls")
	time.Sleep(200 * time.Millisecond) // every lease from before the flush has expired and gone back
	n, err := rdb.Get(ctx, "quota").Int()
	testenv.Must(t, err, "read quota counter")
	if n < 20 {
		t.Fatalf("quota counter %d after the leases expired, want the 20 calls counted since Redis lost its data", n)
	}
	// A lease granted after the flush goes back once it expires.
	testenv.Wait(t, 5*time.Second, "the quota counter back at the 20 calls counted since the flush", func() bool {
		n, err := rdb.Get(ctx, "quota").Int()
		return err == nil && n == 20
	})
}

// slowProxy passes Redis connections through, holding each chunk of
// Redis's replies back 400 ms while slowReplies is set (a client's read
// times out although Redis ran its command), and each chunk of the
// clients' requests while slowRequests is set.
type slowProxy struct {
	addr                      string
	slowReplies, slowRequests atomic.Bool
	// cutReplies drops Redis's next reply and closes its connection, both
	// ends: the client reads EOF although Redis ran its command.
	cutReplies atomic.Bool
	// replyDelay, when set, holds each chunk of Redis's replies back that
	// long instead (a Redis slow but within the client's timeout).
	replyDelay atomic.Int64
	// dropRequests drops the clients' requests: they never reach Redis.
	dropRequests atomic.Bool
}

// pass copies from to to, holding each chunk back while slow is set,
// cutting the connection at the next chunk while cut (if any) is set, and
// dropping each chunk while drop (if any) is set.
func pass(to, from net.Conn, slow, cut *atomic.Bool, delay *atomic.Int64, drop *atomic.Bool) {
	defer to.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := from.Read(buf)
		if err != nil {
			return
		}
		if cut != nil && cut.Load() {
			_ = from.Close()
			return
		}
		if drop != nil && drop.Load() {
			continue
		}
		if slow.Load() {
			time.Sleep(400 * time.Millisecond)
		} else if delay != nil && delay.Load() > 0 {
			time.Sleep(time.Duration(delay.Load()))
		}
		if _, err := to.Write(buf[:n]); err != nil {
			return
		}
	}
}

func newSlowProxy(t *testing.T, target string) *slowProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	t.Cleanup(func() { _ = ln.Close() })
	p := &slowProxy{addr: ln.Addr().String()}
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			go pass(server, client, &p.slowRequests, nil, nil, &p.dropRequests)
			go pass(client, server, &p.slowReplies, &p.cutReplies, &p.replyDelay, nil)
		}
	}()
	return p
}

// A lease request whose reply is lost, timed out or cut off with its
// connection, may still have been granted in Redis: the grant is given
// back later, so the quota counts exactly the calls allowed.
func TestLostLeaseGrantIsGivenBack(t *testing.T) {
	t.Run("reply timed out", func(t *testing.T) {
		lostLeaseGrantIsGivenBack(t, 100*time.Millisecond, 500*time.Millisecond, func(p *slowProxy) *atomic.Bool { return &p.slowReplies })
	})
	t.Run("connection cut before the reply", func(t *testing.T) {
		lostLeaseGrantIsGivenBack(t, 2*time.Second, 500*time.Millisecond, func(p *slowProxy) *atomic.Bool { return &p.cutReplies })
	})
}

// leasingCalls is a limiter on one busy key with a monthly quota, reaching
// Redis through a slowProxy, and the outcome of the calls burst makes.
type leasingCalls struct {
	r               *testenv.Redis
	proxy           *slowProxy
	l               *edgeredis.Limiter
	c               edge.CallLimits
	allowed, failed atomic.Int64
}

func newLeasingCalls(t *testing.T, readTimeout time.Duration) *leasingCalls {
	t.Helper()
	lc := &leasingCalls{r: testenv.NewRedis(t)}
	lc.proxy = newSlowProxy(t, testenv.RedisAddr())
	rdb := redis.NewClient(&redis.Options{Addr: lc.proxy.addr, ReadTimeout: readTimeout, MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	lc.l = edgeredis.NewLimiter(rdb)
	lc.c = edge.CallLimits{Buckets: []string{lc.r.Prefix + "key"}, RPS: 1, Burst: 100_000,
		QuotaBucket: lc.r.Prefix + "quota", QuotaLimit: 10_000, QuotaTTL: time.Hour}
	t.Cleanup(func() { lc.r.Client.Del(context.Background(), "rate:"+lc.r.Prefix+"key") })
	return lc
}

// burst makes n calls at once and counts those allowed and those failed.
func (lc *leasingCalls) burst(n int) {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := lc.l.AllowCall(context.Background(), lc.c)
			switch {
			case err != nil:
				lc.failed.Add(1)
			case res.QuotaAllowed:
				lc.allowed.Add(1)
			}
		}()
	}
	wg.Wait()
}

// lostLeaseGrantIsGivenBack loses replies for hold from the first call that
// lost one.
func lostLeaseGrantIsGivenBack(t *testing.T, readTimeout, hold time.Duration, lose func(*slowProxy) *atomic.Bool) {
	ctx := context.Background()
	lc := newLeasingCalls(t, readTimeout)
	r, proxy, l, c, burst := lc.r, lc.proxy, lc.l, lc.c, lc.burst
	allowed, failed := &lc.allowed, &lc.failed
	burst(200) // busy: the next calls ask for leases
	_, sentBefore := l.Batched()
	lose(proxy).Store(true)
	// The leases the first burst took can decide a whole burst without
	// Redis: burst until one call has had to ask it, and lost its reply.
	for range 20 {
		burst(200)
		if failed.Load() > 0 {
			break
		}
	}
	time.Sleep(hold) // the held replies are gone
	_, sentAfter := l.Batched()
	lose(proxy).Store(false)
	if failed.Load() == 0 {
		t.Fatal("no call lost its reply while Redis's replies were held back or cut")
	}
	time.Sleep(3 * time.Second) // lost grants go back 2 s after the timeout, or after Redis is back
	n, err := r.Client.Get(ctx, c.QuotaBucket).Int64()
	testenv.Must(t, err, "read quota counter")
	// A call decided in Redis alone (not from a lease) whose reply timed
	// out may have been counted, and stays counted: one per such call sent
	// while replies were lost. A lost lease request was up to 256.
	sent := int64(sentAfter - sentBefore)
	if n < allowed.Load() || n > allowed.Load()+sent {
		t.Fatalf("quota counter %d, but %d calls were allowed and %d were sent to Redis while its replies were lost (%d failed); want between the allowed and their sum",
			n, allowed.Load(), sent, failed.Load())
	}
}

// A lost lease grant whose give-back, 2 s after the loss, cannot reach
// Redis either is given back once Redis can be reached again, while Redis
// keeps the grant's record. Before, the give-back was tried once, and each
// grant lost in an outage over 2 s stayed counted against the month.
func TestALostGrantIsGivenBackAfterAFailedGiveBack(t *testing.T) {
	ctx := context.Background()
	lc := newLeasingCalls(t, 100*time.Millisecond)
	r, proxy, l, c, burst := lc.r, lc.proxy, lc.l, lc.c, lc.burst
	allowed, failed := &lc.allowed, &lc.failed
	burst(200) // busy: the next calls ask for leases
	_, sentBefore := l.Batched()
	// Redis runs the lease request, and its reply is lost.
	proxy.slowReplies.Store(true)
	for range 20 {
		burst(200)
		if failed.Load() > 0 {
			break
		}
	}
	if failed.Load() == 0 {
		t.Fatal("no call lost its reply while Redis's replies were held back")
	}
	_, sentAfter := l.Batched()
	// Then nothing reaches Redis for a while: the give-back 2 s after the
	// loss fails.
	proxy.dropRequests.Store(true)
	proxy.slowReplies.Store(false)
	time.Sleep(3 * time.Second)
	errs := l.ReturnErrors()
	proxy.dropRequests.Store(false)
	if errs == 0 {
		t.Fatal("no give-back failed while requests were dropped")
	}
	time.Sleep(2 * time.Second)
	n, err := r.Client.Get(ctx, c.QuotaBucket).Int64()
	testenv.Must(t, err, "read quota counter")
	// As in TestLostLeaseGrantIsGivenBack: one call's worth for each call
	// sent while replies were lost, not a lost lease request's 256.
	sent := int64(sentAfter - sentBefore)
	if n < allowed.Load() || n > allowed.Load()+sent {
		t.Fatalf("quota counter %d, but %d calls were allowed and %d were sent to Redis while its replies were lost (%d failed, %d give-backs failed); want between the allowed and their sum",
			n, allowed.Load(), sent, failed.Load(), errs)
	}
}

// A graceful stop waits for refunds already on their way (here an expired
// lease's, held back in the proxy) before the Redis client closes, so the
// quota counts exactly the calls made.
func TestReturnLeasesWaitsForRefundsInFlight(t *testing.T) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	proxy := newSlowProxy(t, testenv.RedisAddr())
	rdb := redis.NewClient(&redis.Options{Addr: proxy.addr, ReadTimeout: 2 * time.Second, MaxRetries: -1})
	l := edgeredis.NewLimiter(rdb)
	c := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 1, Burst: 100_000,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 10_000, QuotaTTL: time.Hour}
	t.Cleanup(func() { r.Client.Del(ctx, "rate:"+r.Prefix+"key") })
	for range 3 {
		if got := burstOf(t, 200, c, l); got != 200 {
			t.Fatalf("%d of 200 calls allowed under a quota of 10,000", got)
		}
	}
	proxy.slowRequests.Store(true)
	time.Sleep(60 * time.Millisecond) // the lease expired: its refund is held in the proxy
	testenv.Must(t, l.ReturnLeases(ctx), "ReturnLeases")
	testenv.Must(t, rdb.Close(), "close the client")
	n, err := r.Client.Get(ctx, c.QuotaBucket).Int()
	testenv.Must(t, err, "read quota counter")
	if n != 600 {
		t.Fatalf("quota counter %d once ReturnLeases returned, want the 600 calls made", n)
	}
}

// With Redis answering more slowly than the client waits, a call waits
// about one read timeout, then the fallback decides it: the calls queued
// behind a batch that timed out fail with it, and a call still queued
// after a read timeout leaves the queue unsent. Before, each queued call
// waited for every batch ahead of it to time out in turn (2,000 calls at
// once: up to 10 timeouts).
func TestASlowRedisCostsACallOneTimeoutNotOnePerBatchAhead(t *testing.T) {
	t.Run("replies later than the read timeout", func(t *testing.T) { slowRedisCostsOneTimeout(t, false) })
	// Each batch answered within the timeout, but calls come faster than
	// two batches in flight take them.
	t.Run("replies just within the read timeout", func(t *testing.T) { slowRedisCostsOneTimeout(t, true) })
}

func slowRedisCostsOneTimeout(t *testing.T, slowOnly bool) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	proxy := newSlowProxy(t, testenv.RedisAddr())
	const readTimeout = 100 * time.Millisecond
	rdb := redis.NewClient(&redis.Options{Addr: proxy.addr, ReadTimeout: readTimeout, MaxRetries: -1, PoolSize: 256})
	t.Cleanup(func() { _ = rdb.Close() })
	f := &edge.FallbackLimiter{Primary: edgeredis.NewLimiter(rdb), Local: edge.NewLocalLimiter(1)}
	limits := func(i int) edge.CallLimits {
		return edge.CallLimits{Buckets: []string{r.Prefix + "key" + strconv.Itoa(i)}, RPS: 1000, Burst: 1000}
	}
	if _, err := f.AllowCall(ctx, limits(-1)); err != nil {
		t.Fatalf("a call with Redis answering: %v", err)
	}
	switch {
	case slowOnly:
		proxy.replyDelay.Store(int64(readTimeout * 8 / 10))
	default:
		proxy.slowReplies.Store(true)
	}
	var slowest atomic.Int64
	var wg sync.WaitGroup
	for i := range 5000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			began := time.Now()
			if _, err := f.AllowCall(ctx, limits(i)); err != nil {
				t.Errorf("call %d: %v", i, err)
			}
			d := int64(time.Since(began))
			for {
				if s := slowest.Load(); d <= s || slowest.CompareAndSwap(s, d) {
					break
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("the slowest call took %s", time.Duration(slowest.Load()).Round(time.Millisecond))
	// A wait in the queue, or one timeout for its own batch, then a batch
	// taken meanwhile, and room for a busy machine's scheduling of 5,000
	// goroutines: well under the ten timeouts of old.
	if s := time.Duration(slowest.Load()); s > 6*readTimeout {
		t.Fatalf("the slowest of 5,000 calls took %s with a read timeout of %s", s.Round(time.Millisecond), readTimeout)
	}
}

// The calls that waited for a lease request which then failed (Redis out
// of reach) take its error as their own: each asking Redis again cost a
// busy key's calls a second read timeout (docs/edge.md: a call waits about
// one read timeout at most).
func TestCallsThatWaitedForAFailedLeaseRequestDoNotAskAgain(t *testing.T) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	proxy := newSlowProxy(t, testenv.RedisAddr())
	const readTimeout = 200 * time.Millisecond
	rdb := redis.NewClient(&redis.Options{Addr: proxy.addr, ReadTimeout: readTimeout, MaxRetries: -1, PoolSize: 256})
	t.Cleanup(func() { _ = rdb.Close() })
	l := edgeredis.NewLimiter(rdb)
	c := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 100_000, Burst: 100_000}
	t.Cleanup(func() { r.Client.Del(ctx, "rate:"+r.Prefix+"key") })
	// 64 callers without a pause keep the key busy, so its calls lease and
	// wait for the lease requests, before Redis's replies are held back
	// and for 800 ms after.
	var slowFrom atomic.Int64 // when the replies began to be held back
	var slowest, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				began := time.Now()
				_, err := l.AllowCall(ctx, c)
				if from := slowFrom.Load(); from == 0 {
					if err != nil {
						t.Errorf("a call failed with Redis answering: %v", err)
					}
					continue
				} else if began.UnixNano() < from {
					continue
				}
				if err != nil {
					failed.Add(1)
				}
				d := int64(time.Since(began))
				for {
					if s := slowest.Load(); d <= s || slowest.CompareAndSwap(s, d) {
						break
					}
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	leased, _ := l.Leased()
	proxy.slowReplies.Store(true)
	slowFrom.Store(time.Now().UnixNano())
	time.Sleep(800 * time.Millisecond)
	close(stop)
	wg.Wait()
	if leased == 0 || failed.Load() == 0 {
		t.Fatalf("%d calls decided from leases before, %d failed after: the test did not lease, or Redis answered", leased, failed.Load())
	}
	s := time.Duration(slowest.Load())
	t.Logf("%d calls decided from leases before the replies were held back; after, %d failed and the slowest took %s", leased, failed.Load(), s.Round(time.Millisecond))
	// One read timeout, and room for a busy machine's scheduling; a
	// second timeout would be 400 ms.
	if s > readTimeout*8/5 {
		t.Fatalf("the slowest call took %s with a read timeout of %s", s.Round(time.Millisecond), readTimeout)
	}
}
