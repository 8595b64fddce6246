package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/jackc/pgx/v5/pgconn"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/spf13/cobra"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/demo"
	"github.com/tollgate-dev/tollgate/schemas"
)

func demoCommand(g *globalFlags) *cobra.Command {
	var calls int
	var once bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole pipeline with a demo upstream and demo traffic, and say where to look",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, log, err := loadWarned(g)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			context.AfterFunc(ctx, stop) // a second signal ends the process (main)
			return runDemo(ctx, cmd.OutOrStdout(), cfg, log, calls, once)
		},
	}
	cmd.Flags().IntVar(&calls, "calls", 300, "demo calls to send through the edge (0: none, only last month's reported usage)")
	cmd.Flags().BoolVar(&once, "once", false, "exit after the demo traffic has landed instead of serving until interrupted")
	return cmd
}

func runDemo(ctx context.Context, out io.Writer, cfg Config, log *slog.Logger, calls int, once bool) (err error) {
	if calls < 0 {
		return fmt.Errorf("--calls: want 0 or more, got %d", calls)
	}
	up := &demo.Upstream{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo upstream: %w", err)
	}
	upSrv := &http.Server{Handler: up, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = upSrv.Serve(ln) }()
	defer upSrv.Close()
	cfg.Edge.Upstream = "http://" + ln.Addr().String()
	if cfg.Dashboard.Listen == "" {
		cfg.Dashboard.Listen = "127.0.0.1:8090"
	}
	// The dashboard forwards from this host, so the usage and invoice
	// APIs' audit log names the browser's address rather than its own.
	for _, list := range []*[]string{&cfg.Aggregator.TrustedProxies, &cfg.Invoicer.TrustedProxies} {
		if len(*list) == 0 {
			*list = []string{"127.0.0.1", "::1"}
		}
	}
	// Close periods promptly, and show the Stripe sync against stripe-mock
	// when no real Stripe account is configured. The grace is short too: the
	// demo reports last month's events as it starts, so a longer grace only
	// postpones its invoice (by up to an hour in the first hour of a month).
	// It is longer than the watermark ever trails the clock while ingest
	// keeps up (ingest.watermark_skew, 5 s, plus its publishing interval and
	// rounding): at 5 s the invoicer warned every 2 s that the watermark was
	// behind, with nothing wrong.
	cfg.Invoicer.Interval = 2 * time.Second
	cfg.Invoicer.Grace = 15 * time.Second
	if cfg.Invoicer.Stripe.APIKey == "" {
		if u := os.Getenv("TOLLGATE_STRIPE_MOCK_URL"); u != "" {
			cfg.Invoicer.Stripe.APIKey, cfg.Invoicer.Stripe.APIURL = "sk_test_123", u
		}
	}
	if err := demoSandboxed(cfg); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}

	sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	comps, err := allComponents(sctx, cfg, log)
	cancel()
	if err != nil {
		return err
	}
	var edgeAddr string
	for _, n := range comps {
		if m, ok := n.c.(*EdgeMain); ok {
			edgeAddr = m.Addr()
		}
	}
	runCtx, stopRun := context.WithCancel(ctx)
	runErr := make(chan error, 1)
	go func() { runErr <- runComponents(runCtx, log, comps) }()
	// The pipeline's own error (a component that failed, or did not stop
	// cleanly) is the demo's too, as it is tollgate all's: the process
	// exits non-zero.
	running := true
	defer func() {
		if running {
			stopRun()
			err = errors.Join(err, <-runErr)
		}
	}()

	keys, err := demoKeys(ctx, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Demo upstream on %s, edge on http://%s\n", cfg.Edge.Upstream, edgeAddr)
	for _, k := range keys {
		fmt.Fprintf(out, "  demo key for %s (%s): %s\n", k.account, k.env, k.secret)
	}
	start := time.Now()
	sent, err := demo.Traffic(ctx, "http://"+edgeAddr, keysSecrets(keys), calls)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Sent %d demo calls through the edge (%d answered 2xx) in %s\n", sent.Total, sent.OK, time.Since(start).Round(time.Millisecond))
	reported, err := demo.ReportLastMonth(ctx, "http://"+edgeAddr, keysSecrets(keys[:2]), time.Now(), 40)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Reported %d server-side events for last month through POST /v1/events (a rerun reports the same ids: duplicates, absorbed)\n", reported)

	ch, err := openClickHouse(ctx, cfg.Services, cfg.Services.ClickHouseDatabase)
	if err != nil {
		return err
	}
	defer ch.Close()
	accounts := make([]string, 0, len(keys))
	for _, k := range keys {
		accounts = append(accounts, k.account)
	}
	var landed uint64
	deadline := time.Now().Add(60 * time.Second)
	for {
		if landed, err = countLanded(ctx, ch, sent.RequestIDs); err != nil {
			return err
		}
		if landed >= uint64(sent.Total) || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Fprintf(out, "\nLanded in ClickHouse: %d of %d demo calls (usage_events, database %s)\n", landed, sent.Total, cfg.Services.ClickHouseDatabase)
	fmt.Fprintf(out, "\nWhere to look:\n")
	fmt.Fprintf(out, "  edge:        curl -H 'Authorization: Bearer %s' http://%s/v1/widgets\n", keys[0].secret, edgeAddr)
	fmt.Fprintf(out, "  raw events:  clickhouse-client %s -q \"SELECT account_id, count() FROM usage_events FINAL GROUP BY account_id\"\n",
		clientArgs(cfg.Services))
	if hint := clientCAHint(cfg.Services); hint != "" {
		fmt.Fprintf(out, "               %s\n", hint)
	}
	for _, n := range comps {
		if m, ok := n.c.(*InvoiceMain); ok {
			fmt.Fprintf(out, "  invoices:    curl -H 'Authorization: Bearer %s' http://%s/v1/invoices/upcoming   (also /v1/usage/current, /v1/invoices; docs/invoicer.md)\n", keys[0].secret, m.Addr())
		}
	}
	for _, n := range comps {
		if m, ok := n.c.(*AggregateMain); ok {
			fmt.Fprintf(out, "  usage API:   curl -H 'Authorization: Bearer %s' 'http://%s/v1/usage?meter=api_calls&window=minute'   (also /v1/requests; docs/usage-api.md)\n", keys[0].secret, m.Addr())
			fmt.Fprintf(out, "  rollups:     clickhouse-client %s -q \"SELECT * FROM usage_by_window WHERE granularity = 'hour' AND empty(group_values)\"\n",
				clientArgs(cfg.Services))
		}
	}
	for _, n := range comps {
		if m, ok := n.c.(*DashboardMain); ok {
			fmt.Fprintf(out, "  dashboard:   http://%s/   (paste a demo key above)\n", m.Addr())
		}
	}
	if landed != uint64(sent.Total) {
		return fmt.Errorf("only %d of %d demo calls landed in ClickHouse", landed, sent.Total)
	}
	for _, n := range comps {
		if m, ok := n.c.(*InvoiceMain); ok {
			invs, err := demo.WaitForInvoices(ctx, "http://"+m.Addr(), keys[0].secret, 90*time.Second, cfg.Invoicer.Stripe.APIKey != "")
			if err != nil {
				return fmt.Errorf("last month's demo invoice: %w", err)
			}
			fmt.Fprintf(out, "\nInvoices for %s (closed periods, from the ledger):\n", keys[0].account)
			for _, inv := range invs {
				fmt.Fprintf(out, "  %s  %s – %s  %s  total %d %s minor units  %s\n", inv.ID, inv.Period.Start.Format("2006-01-02"),
					inv.Period.End.Format("2006-01-02"), inv.Status, inv.Total, inv.Currency, inv.HostedURL)
			}
		}
	}
	if once {
		return nil
	}
	fmt.Fprintln(out, "\nThe pipeline keeps running; press Ctrl-C to stop it.")
	select {
	case <-ctx.Done():
		return nil // the deferred stop reports how the pipeline stopped
	case err := <-runErr:
		// A component failed and runComponents stopped the rest: the demo
		// ends with its error rather than sitting on a stopped pipeline.
		running = false
		stopRun()
		if err == nil {
			err = errors.New("the pipeline stopped")
		}
		return err
	}
}

// clientArgs are clickhouse-client's arguments for svc's database: its
// port, and its user when not the default (asking for the password, which
// is never printed).
func clientArgs(svc Services) string {
	a := fmt.Sprintf("--port %s -d %s", portOf(svc.ClickHouseAddr), svc.ClickHouseDatabase)
	if svc.ClickHouseUser != "" && svc.ClickHouseUser != "default" {
		a += " --user " + svc.ClickHouseUser
	}
	if svc.ClickHousePassword != "" {
		a += " --ask-password"
	}
	if svc.ClickHouseTLS {
		a += " --secure"
	}
	return a
}

// clientCAHint says how clickhouse-client trusts a private CA, which it
// takes from a configuration file, not from a flag.
func clientCAHint(svc Services) string {
	if !svc.ClickHouseTLS || svc.ClickHouseTLSCAFile == "" {
		return ""
	}
	return fmt.Sprintf("(--secure trusts the CA in %s only through a configuration file, --config-file, whose openSSL.client.caConfig names it)",
		svc.ClickHouseTLSCAFile)
}

// countLanded counts the raw events of the calls with these request ids.
// No ids is no events: ClickHouse cannot type an empty array parameter
// (has() of Array(Nothing) and a String), so it is not asked.
func countLanded(ctx context.Context, ch driver.Conn, requestIDs []string) (uint64, error) {
	if len(requestIDs) == 0 {
		return 0, nil
	}
	var n uint64
	row := ch.QueryRow(ctx, `SELECT count() FROM usage_events FINAL WHERE has(?, request_id)`, requestIDs)
	if err := row.Scan(&n); err != nil {
		return 0, fmt.Errorf("count landed events: %w", err)
	}
	return n, nil
}

func portOf(addr string) string {
	if _, p, err := net.SplitHostPort(addr); err == nil {
		return p
	}
	return addr
}

type demoKey struct {
	account string
	env     schemas.Environment
	secret  string
}

func keysSecrets(keys []demoKey) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.secret
	}
	return out
}

// demoKeys creates three demo accounts with a fresh secret key each; the
// last uses test mode. Secrets are shown once, here, and stored hashed.
func demoKeys(ctx context.Context, cfg Config) ([]demoKey, error) {
	pool, err := openPostgres(ctx, cfg.Services.PostgresURL)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	store := edgepg.NewKeyStore(pool)
	var out []demoKey
	for i, env := range []schemas.Environment{schemas.Live, schemas.Live, schemas.Test} {
		account := fmt.Sprintf("acct_demo_%d", i+1)
		if err := store.EnsureAccount(ctx, account, "Demo customer "+string(rune('A'+i))); err != nil {
			return nil, err
		}
		// Growth-tier limits, so the demo burst is not rate limited.
		if err := store.EnsureSubscription(ctx, account, "growth"); err != nil {
			return nil, err
		}
		// Demo customers have been with us since the start of last month,
		// so the invoicer has a closed period to invoice.
		since := startOfLastMonth(time.Now())
		if _, err := pool.Exec(ctx, `UPDATE accounts SET created_at = $2 WHERE id = $1 AND created_at > $2`, account, since); err != nil {
			return nil, fmt.Errorf("backdate demo account: %w", err)
		}
		if _, err := pool.Exec(ctx, `UPDATE subscriptions SET starts_at = $2 WHERE account_id = $1 AND starts_at > $2`, account, since); err != nil {
			return nil, fmt.Errorf("backdate demo subscription: %w", err)
		}
		secret, parsed, err := edge.GenerateKey(edge.Secret, env)
		if err != nil {
			return nil, err
		}
		id := "key_" + strings.ToLower(parsed.DisplayPrefix[len(parsed.DisplayPrefix)-4:]) + schemas.NewEventID().String()[24:]
		if err := store.CreateKey(ctx, edgepg.NewKey{ID: id, AccountID: account, Name: "demo", Parsed: parsed}); err != nil {
			return nil, err
		}
		out = append(out, demoKey{account: account, env: env, secret: secret})
	}
	return out, nil
}

// startOfLastMonth is midnight UTC on the first day of the month before
// now's (not now minus a month, which on 31 March is still March).
func startOfLastMonth(now time.Time) time.Time {
	first := time.Date(now.UTC().Year(), now.UTC().Month(), 1, 0, 0, 0, 0, time.UTC)
	return first.AddDate(0, -1, 0)
}

// demoSandboxed refuses a configuration the demo must not run on: it
// creates demo accounts and keys, backdates them, and closes every
// account's periods with a 15 s grace instead of the configured one, so it
// runs only against services on this machine's loopback and with no Stripe
// key or a test-mode one. A production configuration (TOLLGATE_CONFIG
// exported on an operator's host, say) is refused, not billed.
func demoSandboxed(cfg Config) error {
	refuse := func(what string) error {
		return fmt.Errorf("tollgate demo refuses this configuration: %s. The demo creates accounts and keys and closes every account's "+
			"billing periods early, so it runs only against services on loopback (make services) and with no Stripe key or a test-mode one", what)
	}
	if k := cfg.Invoicer.Stripe.APIKey; k != "" && !strings.HasPrefix(k, "sk_test_") && !strings.HasPrefix(k, "rk_test_") {
		return refuse("invoicer.stripe.api_key is not a test-mode key")
	}
	hosts := map[string]string{"services.clickhouse_addr": cfg.Services.ClickHouseAddr, "services.redis_addr": cfg.Services.RedisAddr}
	for i, b := range cfg.Services.KafkaBrokers {
		hosts[fmt.Sprintf("services.kafka_brokers[%d]", i)] = b
	}
	// The hosts the driver will use, as it reads the string (a host=
	// parameter overrides the URL's; several hosts are fallbacks).
	pc, err := pgconn.ParseConfig(cfg.Services.PostgresURL)
	if err != nil {
		return refuse("services.postgres_url cannot be parsed")
	}
	pgHosts := []string{pc.Host}
	for _, fb := range pc.Fallbacks {
		pgHosts = append(pgHosts, fb.Host)
	}
	for _, h := range pgHosts {
		if strings.HasPrefix(h, "/") {
			continue // a unix socket: this machine
		}
		if !loopback(h) {
			return refuse("services.postgres_url is not on loopback")
		}
	}
	for key, addr := range hosts {
		if addr == "" {
			continue
		}
		host := addr
		if h, _, err := net.SplitHostPort(addr); err == nil {
			host = h
		}
		if !loopback(host) {
			return refuse(key + " is not on loopback")
		}
	}
	return nil
}

// loopback reports whether host is localhost or a loopback address.
func loopback(host string) bool {
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
