package redis

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// A lease request whose reply was lost is given back by the size it asked
// for, since only Redis knows what it granted. Near the end of the month's
// quota Redis grants less than asked (a lease takes at most a quarter of
// what is left): the quota must then go down by the grant alone, else the
// account gets calls it made for free. (Before, a request for 50 that got
// the last 3 calls of 100 took 50 off the count.)
func TestALostGrantGivesBackNoMoreThanWasGranted(t *testing.T) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	l := NewLimiter(r.Client)
	c := edge.CallLimits{Buckets: []string{r.Prefix + "key"}, RPS: 1, Burst: 100_000,
		QuotaBucket: r.Prefix + "quota", QuotaLimit: 100, QuotaTTL: time.Hour}
	t.Cleanup(func() { r.Client.Del(ctx, gcraPrefix+r.Prefix+"key") })
	testenv.Must(t, r.Client.Set(ctx, c.QuotaBucket, 88, time.Hour).Err(), "seed the quota counter")
	const want = 50
	_, grant, record, err := l.ask(c, want, true)
	testenv.Must(t, err, "ask for a lease")
	if grant != 3 || record == "" {
		t.Fatalf("granted %d with record %q; want 3, a quarter of the quota's last 12, recorded", grant, record)
	}
	l.refundGrant(c, want, record) // as sendLost does once the reply is lost
	n, err := r.Client.Get(ctx, c.QuotaBucket).Int64()
	testenv.Must(t, err, "read the quota counter")
	if n != 88 {
		t.Fatalf("quota counter %d after the lost grant of %d went back; want 88, the calls made", n, grant)
	}
	if got := l.refunded.Load(); got != 3 {
		t.Fatalf("%d tokens counted as given back; want the grant's 3", got)
	}
}

// AddQuota counts calls the local fallback allowed into the month's
// counter, keeping its expiry; a counter Redis lost is made again with one;
// a batch sent again is counted once, and one whose count failed is counted
// when sent again.
func TestAddQuotaCountsIntoTheMonthAndKeepsItExpiring(t *testing.T) {
	ctx := context.Background()
	r := testenv.NewRedis(t)
	l := NewLimiter(r.Client)
	kept, lost := r.Prefix+"quota:kept", r.Prefix+"quota:lost"
	testenv.Must(t, r.Client.Set(ctx, kept, 600, 10*time.Hour).Err(), "seed the month's counter")
	if n, err := l.AddQuota(ctx, kept, "edge-a", 1, 400, time.Hour); err != nil || n != 1000 {
		t.Fatalf("add to a counter: %d, %v; want the count, 1000", n, err)
	}
	if n, err := l.AddQuota(ctx, lost, "edge-a", 2, 7, time.Hour); err != nil || n != 7 {
		t.Fatalf("add to a counter Redis lost: %d, %v; want 7", n, err)
	}
	for _, c := range []struct {
		key     string
		n       int64
		ttlOver time.Duration
	}{{kept, 1000, 9 * time.Hour}, {lost, 7, 59 * time.Minute}} {
		n, err := r.Client.Get(ctx, c.key).Int64()
		testenv.Must(t, err, "read "+c.key)
		ttl, err := r.Client.TTL(ctx, c.key).Result()
		testenv.Must(t, err, "ttl of "+c.key)
		if n != c.n || ttl < c.ttlOver || ttl > 10*time.Hour {
			t.Errorf("%s: count %d, expiry in %s; want %d, expiring after %s", c.key, n, ttl, c.n, c.ttlOver)
		}
	}

	// The same batch sent again, as after a lost reply, adds nothing; nor
	// does an earlier one. Another sender's batch 1 is its own.
	for _, again := range []struct {
		sender string
		seq    uint64
		want   int64
	}{{"edge-a", 1, 1000}, {"edge-b", 1, 1400}, {"edge-b", 1, 1400}} {
		if n, err := l.AddQuota(ctx, kept, again.sender, again.seq, 400, time.Hour); err != nil || n != again.want {
			t.Fatalf("%s's batch %d again: %d, %v; want %d", again.sender, again.seq, n, err, again.want)
		}
	}
	marks := "{" + kept + "}:settled"
	if fields, err := r.Client.HLen(ctx, marks).Result(); err != nil || fields != 2 {
		t.Errorf("%s holds %d fields (%v); want one per sender", marks, fields, err)
	}
	if ttl, err := r.Client.TTL(ctx, marks).Result(); err != nil || ttl <= 59*time.Minute || ttl > time.Hour+time.Second {
		t.Errorf("the batch numbers expire in %s (%v); want about the hour the counter would", ttl, err)
	}

	// A count that fails (a counter of the wrong type) records nothing:
	// the batch sent again once the counter is mended is counted.
	odd := r.Prefix + "quota:odd"
	testenv.Must(t, r.Client.Set(ctx, odd, "not-a-number", time.Hour).Err(), "a counter of the wrong type")
	if _, err := l.AddQuota(ctx, odd, "edge-a", 3, 40, time.Hour); err == nil {
		t.Fatal("an add to a counter that is not a number succeeded")
	}
	testenv.Must(t, r.Client.Del(ctx, odd).Err(), "mend the counter")
	if n, err := l.AddQuota(ctx, odd, "edge-a", 3, 40, time.Hour); err != nil || n != 40 {
		t.Fatalf("the batch sent again once the counter was mended: %d, %v; want 40", n, err)
	}
	if _, err := l.AddQuota(ctx, kept, "", 0, 1, time.Hour); err == nil {
		t.Error("an add without a sender or batch number was taken")
	}
}

// keySlot is Redis Cluster's slot of key: CRC16 (XMODEM) of its hash tag
// (what the first { and the first } after it enclose, when not empty), or
// of the whole key, modulo 16384.
func keySlot(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for _, b := range []byte(key) {
		crc ^= uint16(b) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

// The settle's hash is in its quota counter's cluster slot, with the
// default prefix and with one that carries a hash tag of its own.
func TestTheSettledHashSharesItsCountersSlot(t *testing.T) {
	if got := keySlot("123456789"); got != 0x31C3%16384 {
		t.Fatalf("keySlot is not Redis's: %d for 123456789", got)
	}
	for _, bucket := range []string{"tollgate:rl:quota:acct_1:live:2026-11", "{tollgate}:quota:acct_1:live:2026-11", "a{b:quota:acct_1"} {
		if a, b := keySlot(bucket), keySlot(settledKey(bucket)); a != b {
			t.Errorf("%s in slot %d, its settled hash %s in %d", bucket, a, settledKey(bucket), b)
		}
	}
}

// A lease request that never left the queue (it waited past the read
// timeout, or a batch ahead of it failed) cannot have been granted, so no
// grant of it is given back: before, each scheduled a refund script for a
// grant never made, while Redis was already too slow, and its failure
// counted as tokens left counted.
func TestALeaseRequestNeverSentGivesNothingBack(t *testing.T) {
	r := testenv.NewRedis(t)
	rdb := goredis.NewClient(&goredis.Options{Addr: testenv.RedisAddr(), ReadTimeout: time.Millisecond, MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	l := NewLimiter(rdb)
	var wg sync.WaitGroup
	var unsent, sentAndFailed atomic.Int64
	for i := range 2000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := edge.CallLimits{Buckets: []string{r.Prefix + "k" + strconv.Itoa(i)}, RPS: 1000, Burst: 1000}
			_, _, _, err := l.ask(c, 10, true)
			switch {
			case errors.Is(err, errNotSent):
				unsent.Add(1)
				if mayHaveRun(err) {
					t.Errorf("an unsent request's error %v may have run", err)
				}
			case err != nil:
				sentAndFailed.Add(1)
			}
		}()
	}
	wg.Wait()
	if unsent.Load() == 0 {
		t.Fatalf("no request left unsent (%d sent and failed): the test shows nothing", sentAndFailed.Load())
	}
	t.Logf("%d of 2,000 lease requests unsent, %d sent and failed", unsent.Load(), sentAndFailed.Load())
	l.refunds.mu.Lock()
	lost := int64(len(l.refunds.lost))
	for _, g := range l.refunds.lost {
		g.timer.Stop() // the test's client is closed before they would run
	}
	l.refunds.mu.Unlock()
	if lost > sentAndFailed.Load() {
		t.Fatalf("%d lost grants to give back, more than the %d requests sent", lost, sentAndFailed.Load())
	}
}
