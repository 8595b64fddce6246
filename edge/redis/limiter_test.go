package redis_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// Pipelining many concurrent calls must give the answers separate round
// trips would: here the quota admits exactly 60 of 300 calls.
func TestPipelinedCallsAreExact(t *testing.T) {
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
	pipelines, scripts := l.Pipelined()
	if scripts != calls || pipelines == 0 || pipelines > scripts {
		t.Fatalf("%d scripts in %d pipelines, want %d scripts", scripts, pipelines, calls)
	}
	t.Logf("%d calls in %d pipelines", scripts, pipelines)
}

// After Redis forgets its scripts (a restart, SCRIPT FLUSH), calls reload
// the script instead of failing.
func TestPipelinedCallsSurviveAScriptFlush(t *testing.T) {
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
