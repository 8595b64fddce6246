package edge

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// This test lives inside package edge because the server's clock (Server.now)
// is the only clock the edge offers and it is not exported. For the same
// reason it cannot use edge/postgres or edge/redis (they import edge): keys
// come from memory and the quota is counted by the edge's own LocalLimiter.

// memKeys is a KeyStore holding keys in memory.
type memKeys map[[32]byte]Key

func (m memKeys) KeyByHash(_ context.Context, h [32]byte) (Key, error) {
	k, ok := m[h]
	if !ok {
		return Key{}, ErrKeyNotFound
	}
	return k, nil
}

type dropEvents struct{}

func (dropEvents) Emit(schemas.Event) {}

// quotaStep is one call at a given instant and what the edge must answer.
type quotaStep struct {
	at     string
	status int
	// resetIn is the seconds until the quota month ends, as the
	// RateLimit-Policy window and, on a refusal, as Retry-After.
	resetIn int64
	// retryAt is the quota_exceeded error's retry_at (refusals only).
	retryAt string
}

// TestQuotaMonthFollowsTheAccountTimeZone calls an edge with a monthly
// quota of 2 at chosen instants around a month boundary and checks which
// calls are refused and when the edge says the quota resets. With
// quota_timezone=account the month turns at the account's local midnight;
// with utc, at UTC midnight, for the same account and the same instants.
func TestQuotaMonthFollowsTheAccountTimeZone(t *testing.T) {
	cases := []struct {
		name, zone, quotaTimezone string
		steps                     []quotaStep
	}{
		{
			// Auckland is UTC+13 in summer: its February starts at 11:00 UTC on 31 January.
			name: "Auckland account gets a fresh quota while UTC is still in January",
			zone: "Pacific/Auckland", quotaTimezone: "account",
			steps: []quotaStep{
				{at: "2026-01-31T10:00:00Z", status: 200, resetIn: 3600},
				{at: "2026-01-31T10:30:00Z", status: 200, resetIn: 1800},
				{at: "2026-01-31T10:59:59Z", status: 429, resetIn: 1, retryAt: "2026-01-31T11:00:00Z"},
				{at: "2026-01-31T11:00:00Z", status: 200, resetIn: 28 * 86400},
				{at: "2026-01-31T11:00:01Z", status: 200, resetIn: 28*86400 - 1},
				{at: "2026-01-31T11:00:02Z", status: 429, resetIn: 28*86400 - 2, retryAt: "2026-02-28T11:00:00Z"},
			},
		},
		{
			name: "Auckland account counts UTC months when quota_timezone is utc",
			zone: "Pacific/Auckland", quotaTimezone: "utc",
			steps: []quotaStep{
				{at: "2026-01-31T10:00:00Z", status: 200, resetIn: 14 * 3600},
				{at: "2026-01-31T10:30:00Z", status: 200, resetIn: 13*3600 + 1800},
				{at: "2026-01-31T10:59:59Z", status: 429, resetIn: 13*3600 + 1, retryAt: "2026-02-01T00:00:00Z"},
				{at: "2026-01-31T11:00:00Z", status: 429, resetIn: 13 * 3600, retryAt: "2026-02-01T00:00:00Z"},
				{at: "2026-02-01T00:00:00Z", status: 200, resetIn: 28 * 86400},
			},
		},
		{
			// Los Angeles is UTC-8 in winter: its February starts at 08:00 UTC on 1 February.
			name: "Los Angeles account stays refused after UTC's February began",
			zone: "America/Los_Angeles", quotaTimezone: "account",
			steps: []quotaStep{
				{at: "2026-01-31T23:30:00Z", status: 200, resetIn: 8*3600 + 1800},
				{at: "2026-01-31T23:59:59Z", status: 200, resetIn: 8*3600 + 1},
				{at: "2026-02-01T00:00:00Z", status: 429, resetIn: 8 * 3600, retryAt: "2026-02-01T08:00:00Z"},
				{at: "2026-02-01T07:59:59Z", status: 429, resetIn: 1, retryAt: "2026-02-01T08:00:00Z"},
				{at: "2026-02-01T08:00:00Z", status: 200, resetIn: 28 * 86400},
			},
		},
		{
			name: "Los Angeles account gets a fresh quota at UTC midnight when quota_timezone is utc",
			zone: "America/Los_Angeles", quotaTimezone: "utc",
			steps: []quotaStep{
				{at: "2026-01-31T23:30:00Z", status: 200, resetIn: 1800},
				{at: "2026-01-31T23:59:59Z", status: 200, resetIn: 1},
				{at: "2026-02-01T00:00:00Z", status: 200, resetIn: 28 * 86400},
				{at: "2026-02-01T00:00:01Z", status: 200, resetIn: 28*86400 - 1},
				{at: "2026-02-01T00:00:02Z", status: 429, resetIn: 28*86400 - 2, retryAt: "2026-03-01T00:00:00Z"},
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var upstreamCalls atomic.Int64
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				upstreamCalls.Add(1)
				_, _ = w.Write([]byte("ok\n"))
			}))
			t.Cleanup(up.Close)

			secret, parsed, err := GenerateKey(Secret, schemas.Live)
			if err != nil {
				t.Fatal(err)
			}
			two := int64(2)
			keys := memKeys{parsed.Hash: {
				ID: "key_tz", AccountID: "acct_tz", Environment: schemas.Live, Kind: Secret, Hash: parsed.Hash[:],
				Plan:            Plan{ID: "quota2", Limits: Limits{RequestsPerSecond: 1000, Burst: 1000, MonthlyRequests: &two}},
				AccountTimezone: c.zone,
			}}
			lim := NewLocalLimiter(1)
			srv, err := NewServer(Config{Upstream: up.URL, QuotaTimezone: c.quotaTimezone},
				Deps{Keys: keys, Emitter: dropEvents{}, Limiter: lim, Quota: lim})
			if err != nil {
				t.Fatal(err)
			}
			// Calls are served synchronously below, so the clock needs no lock.
			var now time.Time
			srv.now = func() time.Time { return now }

			served := int64(0)
			for i, s := range c.steps {
				now, err = time.Parse(time.RFC3339, s.at)
				if err != nil {
					t.Fatal(err)
				}
				req := httptest.NewRequest("GET", "/v1/things", nil)
				req.Header.Set("Authorization", "Bearer "+secret)
				rec := httptest.NewRecorder()
				srv.ServeHTTP(rec, req)

				if rec.Code != s.status {
					t.Fatalf("call %d at %s: status %d, want %d: %s", i, s.at, rec.Code, s.status, rec.Body)
				}
				wantPolicy := fmt.Sprintf(`, "monthly";q=2;w=%d`, s.resetIn)
				if got := rec.Header().Get("RateLimit-Policy"); !strings.HasSuffix(got, wantPolicy) {
					t.Errorf("call %d at %s: RateLimit-Policy %q, want it to end with %q", i, s.at, got, wantPolicy)
				}
				if s.status == 200 {
					served++
					continue
				}
				var body struct {
					Error APIError `json:"error"`
				}
				if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
					t.Fatalf("call %d at %s: decode %q: %v", i, s.at, rec.Body, err)
				}
				e := body.Error
				retryAfter := int64(-1)
				if e.RetryAfter != nil {
					retryAfter = *e.RetryAfter
				}
				if e.Code != "quota_exceeded" || e.Limit != "monthly" || e.RetryAt != s.retryAt || retryAfter != s.resetIn {
					t.Errorf("call %d at %s: error %s, limit %s, retry_at %s, retry_after %d; want quota_exceeded, monthly, %s, %d",
						i, s.at, e.Code, e.Limit, e.RetryAt, retryAfter, s.retryAt, s.resetIn)
				}
				if got := rec.Header().Get("Retry-After"); got != strconv.FormatInt(s.resetIn, 10) {
					t.Errorf("call %d at %s: Retry-After %q, want %d", i, s.at, got, s.resetIn)
				}
			}
			if got := upstreamCalls.Load(); got != served {
				t.Errorf("upstream served %d calls, want %d (refused calls must not reach it)", got, served)
			}
		})
	}
}
