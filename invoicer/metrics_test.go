package invoicer_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/invoicer/stripe"
	"github.com/tollgate-dev/tollgate/invoicer/stripe/stripetest"
)

// The invoicer's metrics count what each run did, so an operator can
// alert on invoices that stop coming: a run that left an account
// uninvoiced or an invoice out of Stripe counts as failed and leaves the
// last success where it was; the next clean run moves it.
func TestTheInvoicersMetricsCountWhatItsRunsDid(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_metrics_a", 10)
	e.starter(t, "acct_metrics_b", 5)
	e.account(t, "acct_metrics_bad", "UTC")
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('broken_metrics', 1, 'Broken', 'usd', '{"prices": 7}')`)
	testenv.Must(t, err, "insert a plan that does not load")
	e.subscribe(t, "acct_metrics_bad", "broken_metrics", march.AddDate(0, -1, 0), nil)
	wm := april.Add(2 * time.Hour)
	e.watermark(t, wm)
	fake := stripetest.New()
	defer fake.Close()
	// Stripe cuts every invoice creation off in the first run.
	fake.SetHook(func(kind, phase string) {
		if kind == "invoice" && phase == "before" {
			panic(http.ErrAbortHandler)
		}
	})
	reg := prometheus.NewRegistry()
	now := april.AddDate(0, 0, 3)
	iv, err := invoicer.New(e.store, e.usage, e.usage, stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL}),
		invoicer.Options{Grace: time.Hour, Lookback: 1, Now: func() time.Time { return now }, Registerer: reg}, quiet())
	testenv.Must(t, err, "new invoicer")
	metric := func(name string, labels ...string) float64 {
		t.Helper()
		return metricValue(t, reg, name, labels...)
	}
	if err := iv.Once(ctx); err == nil {
		t.Fatal("a run whose Stripe sync failed returned no error")
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tollgate_invoicer_runs_total", []string{"result", "failed"}, 1},
		{"tollgate_invoicer_runs_total", []string{"result", "ok"}, 0},
		{"tollgate_invoicer_last_success_timestamp_seconds", nil, 0},
		{"tollgate_invoicer_invoices_finalized_total", nil, 2},
		{"tollgate_invoicer_accounts_not_invoiced_total", nil, 1},
		{"tollgate_invoicer_watermark_lag_seconds", nil, now.Sub(wm).Seconds()},
		{"tollgate_invoicer_stripe_unsynced_invoices", nil, 2},
		{"tollgate_invoicer_stripe_sync_errors_total", []string{"kind", "invoice"}, 2},
		{"tollgate_invoicer_stripe_synced_total", []string{"kind", "invoice"}, 0},
	} {
		if got := metric(c.name, c.labels...); got != c.want {
			t.Errorf("after the failed run: %s %v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// Stripe takes them now, but the broken account is still there: the
	// run returns no error, and still counts as failed.
	fake.SetHook(nil)
	testenv.Must(t, iv.Once(ctx), "the second run")
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tollgate_invoicer_runs_total", []string{"result", "failed"}, 2},
		{"tollgate_invoicer_runs_total", []string{"result", "ok"}, 0},
		{"tollgate_invoicer_last_success_timestamp_seconds", nil, 0},
		{"tollgate_invoicer_accounts_not_invoiced_total", nil, 2},
		{"tollgate_invoicer_stripe_synced_total", []string{"kind", "invoice"}, 2},
		{"tollgate_invoicer_stripe_sync_errors_total", []string{"kind", "invoice"}, 2},
	} {
		if got := metric(c.name, c.labels...); got != c.want {
			t.Errorf("after the second run: %s %v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// The broken account leaves the books: the run is clean.
	_, err = e.pg.Pool.Exec(ctx, `DELETE FROM subscriptions WHERE account_id = 'acct_metrics_bad'`)
	testenv.Must(t, err, "end the broken subscription")
	_, err = e.pg.Pool.Exec(ctx, `DELETE FROM accounts WHERE id = 'acct_metrics_bad'`)
	testenv.Must(t, err, "remove the broken account")
	now = now.Add(time.Minute)
	testenv.Must(t, iv.Once(ctx), "the third run")
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tollgate_invoicer_runs_total", []string{"result", "failed"}, 2},
		{"tollgate_invoicer_runs_total", []string{"result", "ok"}, 1},
		{"tollgate_invoicer_last_success_timestamp_seconds", nil, float64(now.Unix())},
		{"tollgate_invoicer_invoices_finalized_total", nil, 2},
		{"tollgate_invoicer_accounts_not_invoiced_total", nil, 2},
		{"tollgate_invoicer_watermark_lag_seconds", nil, now.Sub(wm).Seconds()},
		{"tollgate_invoicer_stripe_unsynced_invoices", nil, 0},
		{"tollgate_invoicer_stripe_synced_total", []string{"kind", "invoice"}, 2},
	} {
		if got := metric(c.name, c.labels...); got != c.want {
			t.Errorf("after the clean run: %s %v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if n := len(fake.Invoices()); n != 2 {
		t.Errorf("Stripe holds %d invoices, want 2", n)
	}
	if n := testutil.CollectAndCount(reg); n < 8 {
		t.Errorf("%d metrics registered, want the invoicer's 8 at least", n)
	}
}

// metricValue is the value in reg of the counter or gauge name whose
// labels match labels (name, value pairs).
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() != labels[i+1] {
						continue next
					}
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no metric %s %v", name, labels)
	return 0
}

// An account whose time zone cannot be loaded (set in Postgres by hand, or
// removed by a tzdata update) is not invoiced, and the run says so as for
// any account that cannot be: it counts as failed and in
// accounts_not_invoiced. Before, a log line was all, and the account's
// periods slid out of lookback_months unbilled. Once its zone is mended it
// is invoiced.
func TestAnAccountWithAnUnknownZoneFailsTheRun(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_zone_ok", 10)
	e.starter(t, "acct_zone_bad", 10)
	_, err := e.pg.Pool.Exec(ctx, `UPDATE accounts SET timezone = 'Mars/Olympus_Mons' WHERE id = 'acct_zone_bad'`)
	testenv.Must(t, err, "set a zone no tzdata has")
	e.watermark(t, april.Add(2*time.Hour))
	reg := prometheus.NewRegistry()
	now := april.AddDate(0, 0, 3)
	iv, err := invoicer.New(e.store, e.usage, e.usage, nil,
		invoicer.Options{Grace: time.Hour, Lookback: 1, Now: func() time.Time { return now }, Registerer: reg}, quiet())
	testenv.Must(t, err, "new invoicer")
	testenv.Must(t, iv.Once(ctx), "the first run")
	if got := metricValue(t, reg, "tollgate_invoicer_runs_total", "result", "failed"); got != 1 {
		t.Errorf("failed runs %v, want 1", got)
	}
	if got := metricValue(t, reg, "tollgate_invoicer_accounts_not_invoiced_total"); got != 1 {
		t.Errorf("accounts not invoiced %v, want 1", got)
	}
	if got := metricValue(t, reg, "tollgate_invoicer_invoices_finalized_total"); got != 1 {
		t.Errorf("invoices %v, want the other account's 1", got)
	}
	_, err = e.pg.Pool.Exec(ctx, `UPDATE accounts SET timezone = 'Europe/Berlin' WHERE id = 'acct_zone_bad'`)
	testenv.Must(t, err, "mend the zone")
	now = now.Add(time.Minute)
	testenv.Must(t, iv.Once(ctx), "the second run")
	if got := metricValue(t, reg, "tollgate_invoicer_runs_total", "result", "ok"); got != 1 {
		t.Errorf("clean runs %v, want 1", got)
	}
	if got := metricValue(t, reg, "tollgate_invoicer_invoices_finalized_total"); got != 2 {
		t.Errorf("invoices %v, want 2 once the zone is mended", got)
	}
}

// A second invoicer on one metrics registry is refused with an error, not
// a panic from the registry.
func TestASecondInvoicerOnOneRegistryIsAnErrorNotAPanic(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	opts := invoicer.Options{Grace: time.Hour, Lookback: 1, Registerer: reg}
	_, err := invoicer.New(e.store, e.usage, e.usage, nil, opts, quiet())
	testenv.Must(t, err, "the first invoicer")
	if _, err := invoicer.New(e.store, e.usage, e.usage, nil, opts, quiet()); err == nil || !strings.Contains(err.Error(), "register invoicer metrics") {
		t.Fatalf("a second invoicer on the registry: %v, want an error", err)
	}
}
