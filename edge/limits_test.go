package edge

import (
	"context"
	"strconv"
	"testing"
	"time"
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
