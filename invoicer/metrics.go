package invoicer

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the invoicer's Prometheus metrics: what an operator alerts
// on when invoices stop coming (runs failing, the watermark stalled, an
// account that cannot be invoiced, Stripe refusing).
type metrics struct {
	runs         *prometheus.CounterVec
	lastSuccess  prometheus.Gauge
	invoices     prometheus.Counter
	notInvoiced  prometheus.Counter
	watermarkLag prometheus.Gauge
	synced       *prometheus.CounterVec
	syncFailed   *prometheus.CounterVec
	unsynced     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_invoicer_runs_total",
			Help: "Invoicer runs (a close of due periods, then a Stripe sync) by result: ok, or failed (the cause is logged; the run is retried next interval).",
		}, []string{"result"}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tollgate_invoicer_last_success_timestamp_seconds",
			Help: "Unix time at which the last run that closed and synced without error ended (0: none yet).",
		}),
		invoices: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_invoicer_invoices_finalized_total",
			Help: "Invoices finalized in the ledger by closes of this process.",
		}),
		notInvoiced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_invoicer_accounts_not_invoiced_total",
			Help: "Account periods a close could not invoice (a plan that does not load, say); each is logged and tried again on the next run.",
		}),
		watermarkLag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tollgate_invoicer_watermark_lag_seconds",
			Help: "How far the usage watermark trailed the clock at the last close that read it; a period is closed once the watermark passes its end plus invoicer.grace.",
		}),
		synced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_invoicer_stripe_synced_total",
			Help: "Documents sent to Stripe, by kind: invoice or credit_note.",
		}, []string{"kind"}),
		syncFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_invoicer_stripe_sync_errors_total",
			Help: "Documents Stripe did not take, by kind (invoice or credit_note); each is logged and tried again on the next run.",
		}, []string{"kind"}),
		unsynced: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tollgate_invoicer_stripe_unsynced_invoices",
			Help: "Finalized invoices not yet in Stripe when the last sync began.",
		}),
	}
	for _, r := range []string{"ok", "failed"} {
		m.runs.WithLabelValues(r)
	}
	for _, k := range []string{"invoice", "credit_note"} {
		m.synced.WithLabelValues(k)
		m.syncFailed.WithLabelValues(k)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.runs, m.lastSuccess, m.invoices, m.notInvoiced, m.watermarkLag, m.synced, m.syncFailed, m.unsynced} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register invoicer metrics: %w", err)
			}
		}
	}
	return m, nil
}

// ran records one run's end.
func (m *metrics) ran(err error, at time.Time) {
	if err != nil {
		m.runs.WithLabelValues("failed").Inc()
		return
	}
	m.runs.WithLabelValues("ok").Inc()
	m.lastSuccess.Set(float64(at.UnixNano()) / 1e9)
}
