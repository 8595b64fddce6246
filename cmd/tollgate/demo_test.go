package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"slices"
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
	runDemoOnce(t, 120,
		"Sent 120 demo calls through the edge (120 answered 2xx)",
		"Landed in ClickHouse: 120 of 120 demo calls",
		"  edge:        curl -H 'Authorization: Bearer sk_live_",
		"  usage API:   curl",
		"  invoices:    curl",
		"  dashboard:   http://127.0.0.1:",
	)
}

// More calls than the demo plan's burst: they are paced under its rate,
// so every one is answered and lands, and last month's report is not
// refused. Sent at once, a third were refused (and never landed, which the
// demo reported as a failure), and the report after them got a 429 that
// ended the demo.
func TestDemoSendsMoreCallsThanItsPlansBurst(t *testing.T) {
	runDemoOnce(t, 700,
		"Sent 700 demo calls through the edge (700 answered 2xx)",
		"Landed in ClickHouse: 700 of 700 demo calls",
	)
}

// A demo that keeps running ends with the pipeline's error, as tollgate
// all does: here the edge cannot finish a call whose upload stalls within
// its 15 s stop. The demo returned nil, so the process exited 0.
func TestADemoEndsWithThePipelinesError(t *testing.T) {
	cfg, _, _ := isolatedConfig(t)
	t.Setenv("TOLLGATE_STRIPE_MOCK_URL", testenv.StripeMockURL())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out := &testenv.LogBuffer{}
	done := make(chan error, 1)
	go func() { done <- runDemo(ctx, out, cfg, slog.New(slog.DiscardHandler), 0, false) }()
	var text string
	for !strings.Contains(text, "keeps running") {
		select {
		case err := <-done:
			t.Fatalf("the demo ended before it kept running: %v\n%s", err, out.String())
		case <-time.After(100 * time.Millisecond):
		}
		text = out.String()
	}
	edgeAddr := regexp.MustCompile(`edge on http://(\S+)`).FindStringSubmatch(text)
	key := regexp.MustCompile(`\(live\): (sk_live_\S+)`).FindStringSubmatch(text)
	if edgeAddr == nil || key == nil {
		t.Fatalf("no edge address or live key in:\n%s", text)
	}
	conn, err := net.Dial("tcp", edgeAddr[1])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// An upload that stops after two of its hundred bytes.
	if _, err := fmt.Fprintf(conn, "POST /v1/widgets HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer %s\r\nContent-Length: 100\r\n\r\nab", key[1]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // admitted and proxied, its body awaited
	cancel()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "edge shutdown") {
			t.Fatalf("the demo ended with %v, want the edge's stop error", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the demo did not end")
	}
}

// TestDemoWithNoCallsStillShowsLastMonthsInvoice: `--calls 0` sends no call
// (ClickHouse was asked about an empty list of request ids, and refused to
// type it) but still reports and invoices last month's usage.
func TestDemoWithNoCallsStillShowsLastMonthsInvoice(t *testing.T) {
	runDemoOnce(t, 0,
		"Sent 0 demo calls through the edge (0 answered 2xx)",
		"Landed in ClickHouse: 0 of 0 demo calls",
		"  usage API:   curl",
	)
}

// The demo creates accounts and keys and closes every account's periods
// with a 15 s grace: it refuses a configuration that names a live Stripe key
// or a service off loopback (a production TOLLGATE_CONFIG, say), before it
// touches anything.
func TestDemoRefusesAProductionConfiguration(t *testing.T) {
	cfg, _, _ := isolatedConfig(t)
	if err := demoSandboxed(cfg); err != nil {
		t.Fatalf("the local services' configuration: %v", err)
	}
	for _, u := range []string{"postgres://tollgate@[::1]:15432/tollgate", "host=localhost port=15432 user=tollgate",
		"postgres:///tollgate?host=/var/run/postgresql"} {
		c := cfg
		c.Services.PostgresURL = u
		if err := demoSandboxed(c); err != nil {
			t.Errorf("postgres at %s: %v, want it taken as this machine's", u, err)
		}
	}
	for name, edit := range map[string]func(*Config){
		"a live Stripe key":        func(c *Config) { c.Invoicer.Stripe.APIKey = "sk_live_123" },
		"postgres off loopback":    func(c *Config) { c.Services.PostgresURL = "postgres://u:secret@db.internal:5432/x" },
		"clickhouse off loopback":  func(c *Config) { c.Services.ClickHouseAddr = "10.0.0.5:9000" },
		"a kafka broker elsewhere": func(c *Config) { c.Services.KafkaBrokers = append(c.Services.KafkaBrokers, "kafka-1:9092") },
		"redis elsewhere":          func(c *Config) { c.Services.RedisAddr = "redis.internal:6379" },
		"postgres elsewhere by its host parameter": func(c *Config) {
			c.Services.PostgresURL = "postgres://tollgate@127.0.0.1:15432/tollgate?host=db.prod.internal"
		},
		"a postgres fallback elsewhere": func(c *Config) { c.Services.PostgresURL = "postgres://tollgate@127.0.0.1:1,db.prod:5432/tollgate" },
	} {
		c := cfg
		c.Services.KafkaBrokers = slices.Clone(cfg.Services.KafkaBrokers)
		edit(&c)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		var out strings.Builder
		err := runDemo(ctx, &out, c, slog.New(slog.DiscardHandler), 1, true)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "refuses this configuration") || strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: %v; want the demo refused, without the configuration's secrets", name, err)
		}
	}
}

func TestDemoRefusesANegativeNumberOfCalls(t *testing.T) {
	// Its own databases and topics, so that a demo that did start would
	// touch no one else's.
	cfg, _, _ := isolatedConfig(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out strings.Builder
	err := runDemo(ctx, &out, cfg, slog.New(slog.DiscardHandler), -1, true)
	if err == nil || !strings.Contains(err.Error(), "--calls") {
		t.Fatalf("got %v, want --calls refused", err)
	}
	if out.Len() != 0 {
		t.Errorf("the demo started anyway:\n%s", out.String())
	}
}

// runDemoOnce runs `tollgate demo --once --calls calls` on this test's own
// services and checks that what it printed holds every line of wants and
// last month's invoice: the demo accounts are on the growth plan, whose first million
// calls are included, so the 40 reported events cost nothing beyond the
// 99.00 usd base fee; stripe-mock finalized it ("open").
func runDemoOnce(t *testing.T, calls int, wants ...string) {
	t.Helper()
	cfg, _, _ := isolatedConfig(t)
	t.Setenv("TOLLGATE_STRIPE_MOCK_URL", testenv.StripeMockURL())
	// The demo closes last month with a grace of seconds, not the default
	// hour (its invoicer runs on the wall clock), so this also passes in the
	// first hour of a month.

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out strings.Builder
	began := time.Now()
	if err := runDemo(ctx, &out, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), calls, true); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	ended := time.Now()
	text := out.String()
	for _, want := range wants {
		if !strings.Contains(text, want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, text)
		}
	}
	var lines, names []string
	for _, last := range lastMonthsDuring(began, ended) {
		lines = append(lines, `inv_`+last.Format("200601")+`_[0-9a-f]+  `+last.Format("2006-01")+`-01`)
		names = append(names, last.Format("2006-01"))
	}
	inv := regexp.MustCompile(`(?m)^  (?:` + strings.Join(lines, "|") + `) – \d{4}-\d{2}-01  open  total 9900 usd minor units`)
	if !inv.MatchString(text) {
		t.Errorf("no synced 9900 usd invoice for %s in:\n%s", strings.Join(names, " or "), text)
	}
}

// lastMonthsDuring is "last month" (startOfLastMonth) for a demo run from
// began to ended. It is one month, except for a run across the turn of a
// month: the demo takes "last month" from the moment it creates its
// accounts, which is then the last month of either side.
func lastMonthsDuring(began, ended time.Time) []time.Time {
	first, second := startOfLastMonth(began), startOfLastMonth(ended)
	if first.Equal(second) {
		return []time.Time{first}
	}
	return []time.Time{first, second}
}

func TestLastMonthsDuringARun(t *testing.T) {
	const run = 3 * time.Minute
	for _, first := range []string{"2026-01-01", "2026-03-01", "2026-05-01", "2027-01-01"} {
		d, _ := time.Parse(time.DateOnly, first)
		for m := -24 * 60; m < 24*60; m++ {
			began := d.Add(time.Duration(m)*time.Minute + 17*time.Second)
			got := lastMonthsDuring(began, began.Add(run))
			// Every instant of the run: its last month is among those named.
			for at := began; !at.After(began.Add(run)); at = at.Add(time.Second) {
				if want := startOfLastMonth(at); !slices.ContainsFunc(got, want.Equal) {
					t.Fatalf("run from %s: last month at %s is %s, not among %v", began.Format(time.RFC3339), at.Format(time.RFC3339), want, got)
				}
			}
			want := 1
			if !startOfLastMonth(began).Equal(startOfLastMonth(began.Add(run))) {
				want = 2 // the run straddles the turn of a month
			}
			if len(got) != want {
				t.Fatalf("run from %s: months %v, want %d", began.Format(time.RFC3339), got, want)
			}
		}
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

// The demo's clickhouse-client hints name a user that is not the default,
// and ask for its password rather than print it.
func TestTheDemosClickHouseHintsNameTheUser(t *testing.T) {
	svc := Services{ClickHouseAddr: "127.0.0.1:19000", ClickHouseDatabase: "tollgate", ClickHouseUser: "default"}
	if got, want := clientArgs(svc), "--port 19000 -d tollgate"; got != want {
		t.Errorf("default user: %q, want %q", got, want)
	}
	svc.ClickHouseUser, svc.ClickHousePassword = "analyst", "s3cret"
	if got, want := clientArgs(svc), "--port 19000 -d tollgate --user analyst --ask-password"; got != want {
		t.Errorf("a user with a password: %q, want %q", got, want)
	}
	if hint := clientCAHint(svc); hint != "" {
		t.Errorf("a CA hint without TLS: %q", hint)
	}
	svc.ClickHouseTLS, svc.ClickHouseTLSCAFile = true, "/etc/tollgate/ch-ca.pem"
	if got := clientArgs(svc); !strings.HasSuffix(got, " --secure") {
		t.Errorf("over TLS: %q, want --secure", got)
	}
	if hint := clientCAHint(svc); !strings.Contains(hint, "/etc/tollgate/ch-ca.pem") || !strings.Contains(hint, "openSSL.client.caConfig") {
		t.Errorf("a private CA: hint %q does not say how clickhouse-client trusts it", hint)
	}
}
