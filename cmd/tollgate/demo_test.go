package main

import (
	"context"
	"io"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// TestDemoRunsTheWholePipelineOnce runs what `make up` runs (`tollgate demo
// --once`) on this test's own Postgres and ClickHouse databases and Kafka
// topics, and checks what it tells a newcomer: every demo call answered and
// landed, where to look, and last month's invoice from the ledger, synced
// to stripe-mock.
func TestDemoRunsTheWholePipelineOnce(t *testing.T) {
	cfg, _, _ := isolatedConfig(t)
	t.Setenv("TOLLGATE_STRIPE_MOCK_URL", testenv.StripeMockURL())

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out strings.Builder
	const calls = 120
	if err := runDemo(ctx, &out, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), calls, true); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	for _, want := range []string{
		"Sent 120 demo calls through the edge (120 answered 2xx)",
		"Landed in ClickHouse: 120 of 120 demo calls",
		"  edge:        curl -H 'Authorization: Bearer sk_live_",
		"  usage API:   curl",
		"  invoices:    curl",
		"  dashboard:   http://127.0.0.1:",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, text)
		}
	}
	// Last month's invoice: the demo accounts are on the growth plan, whose
	// first million calls are included, so the 40 reported events cost
	// nothing beyond the 99.00 usd base fee; stripe-mock finalized it
	// ("open").
	last := startOfLastMonth(time.Now())
	inv := regexp.MustCompile(`(?m)^  inv_` + last.Format("200601") + `_[0-9a-f]+  ` + last.Format("2006-01") +
		`-01 – \d{4}-\d{2}-01  open  total 9900 usd minor units`)
	if !inv.MatchString(text) {
		t.Errorf("no synced 9900 usd invoice for %s in:\n%s", last.Format("2006-01"), text)
	}
}

func TestStartOfLastMonth(t *testing.T) {
	for now, want := range map[string]string{
		"2026-03-31T12:00:00Z": "2026-02-01T00:00:00Z",
		"2026-01-15T00:00:00Z": "2025-12-01T00:00:00Z",
		"2026-03-01T00:00:00Z": "2026-02-01T00:00:00Z",
		"2026-05-31T23:30:00Z": "2026-04-01T00:00:00Z",
	} {
		n, _ := time.Parse(time.RFC3339, now)
		if got := startOfLastMonth(n).Format(time.RFC3339); got != want {
			t.Errorf("startOfLastMonth(%s) = %s, want %s", now, got, want)
		}
	}
}
