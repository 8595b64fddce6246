package edge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

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
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// Real Postgres (the account's zone, the plan), Redis (the quota
			// counter) and Kafka; only the edge's clock is set by the test.
			env := edgetest.New(t)
			var clock atomic.Pointer[time.Time]
			start := time.Now()
			clock.Store(&start)
			in := env.Start(t, edgetest.Options{
				Now:    func() time.Time { return *clock.Load() },
				Config: func(cfg *edge.Config) { cfg.QuotaTimezone = c.quotaTimezone },
			})
			account := fmt.Sprintf("acct_tz_%d", i)
			secret, _ := env.Key(t, account, edge.Secret, schemas.Live)
			two := int64(2)
			env.SetPlan(t, account, "quota2", edge.Limits{RequestsPerSecond: 1000, Burst: 1000, MonthlyRequests: &two}, "")
			_, err := env.PG.Pool.Exec(context.Background(), `UPDATE accounts SET timezone = $1 WHERE id = $2`, c.zone, account)
			testenv.Must(t, err, "set the account's time zone")
			before := env.Live.Calls()

			served := int64(0)
			for i, s := range c.steps {
				at, err := time.Parse(time.RFC3339, s.at)
				if err != nil {
					t.Fatal(err)
				}
				clock.Store(&at)
				req, err := http.NewRequest("GET", in.URL+"/v1/things", nil)
				testenv.Must(t, err, "request")
				req.Header.Set("Authorization", "Bearer "+secret)
				resp, err := http.DefaultClient.Do(req)
				testenv.Must(t, err, "call the edge")
				raw, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				testenv.Must(t, err, "read the answer")

				if resp.StatusCode != s.status {
					t.Fatalf("call %d at %s: status %d, want %d: %s", i, s.at, resp.StatusCode, s.status, raw)
				}
				wantPolicy := fmt.Sprintf(`, "monthly";q=2;w=%d`, s.resetIn)
				if got := resp.Header.Get("RateLimit-Policy"); !strings.HasSuffix(got, wantPolicy) {
					t.Errorf("call %d at %s: RateLimit-Policy %q, want it to end with %q", i, s.at, got, wantPolicy)
				}
				if s.status == 200 {
					served++
					continue
				}
				var body struct {
					Error edge.APIError `json:"error"`
				}
				if err := json.Unmarshal(raw, &body); err != nil {
					t.Fatalf("call %d at %s: decode %q: %v", i, s.at, raw, err)
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
				if got := resp.Header.Get("Retry-After"); got != strconv.FormatInt(s.resetIn, 10) {
					t.Errorf("call %d at %s: Retry-After %q, want %d", i, s.at, got, s.resetIn)
				}
			}
			if got := env.Live.Calls() - before; got != served {
				t.Errorf("upstream served %d calls, want %d (refused calls must not reach it)", got, served)
			}
		})
	}
}
