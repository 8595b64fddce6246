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
