package postgres

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tollgate-dev/tollgate/edge"
)

// AuditWriter records failed authentications without letting a flood of
// them reach the database: events are folded per flush interval by (action,
// key prefix, remote address, reason, key), so one client hammering one bad
// key costs one row per interval with its count; at most MaxDistinct rows
// are written per interval and the rest are folded into one overflow row.
// Record never blocks on the database.
type AuditWriter struct {
	pool     *pgxpool.Pool
	log      *slog.Logger
	interval time.Duration

	mu      sync.Mutex
	pending map[foldKey]*folded
	over    *folded

	rows    prometheus.Counter
	dropped prometheus.Counter
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// MaxDistinct bounds the audit rows written per flush interval.
const MaxDistinct = 1000

type foldKey struct {
	action, prefix, remote, reason, account, key, actor string
}

type folded struct {
	first, last time.Time
	count       int
}

var _ edge.Auditor = (*AuditWriter)(nil)

// NewAuditWriter starts a writer that flushes every interval.
func NewAuditWriter(pool *pgxpool.Pool, interval time.Duration, reg prometheus.Registerer, log *slog.Logger) (*AuditWriter, error) {
	w := &AuditWriter{
		pool: pool, log: log, interval: interval, pending: map[foldKey]*folded{},
		rows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_audit_rows_total", Help: "Failed-authentication audit rows written.",
		}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_audit_overflow_total", Help: "Failed authentications folded into overflow rows.",
		}),
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{w.rows, w.dropped} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	go w.run()
	return w, nil
}

// Record folds ev into the pending rows.
func (w *AuditWriter) Record(ev edge.AuditEvent) {
	k := foldKey{ev.Action, ev.KeyPrefix, ev.RemoteAddr, ev.Reason, ev.AccountID, ev.KeyID, ev.Actor}
	n := max(ev.Count, 1)
	w.mu.Lock()
	defer w.mu.Unlock()
	f := w.pending[k]
	if f == nil {
		if len(w.pending) >= MaxDistinct {
			if w.over == nil {
				w.over = &folded{first: ev.At}
			}
			w.over.last = ev.At
			w.over.count += n
			w.dropped.Add(float64(n))
			return
		}
		f = &folded{first: ev.At}
		w.pending[k] = f
	}
	f.last = ev.At
	f.count += n
}

func (w *AuditWriter) run() {
	defer close(w.done)
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			w.Flush(context.Background())
		case <-w.stop:
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			w.Flush(ctx)
			cancel()
			return
		}
	}
}

// Flush writes the pending rows now.
func (w *AuditWriter) Flush(ctx context.Context) {
	w.mu.Lock()
	pending, over := w.pending, w.over
	w.pending, w.over = map[foldKey]*folded{}, nil
	w.mu.Unlock()
	if len(pending) == 0 && over == nil {
		return
	}
	batch := &pgx.Batch{}
	const q = `INSERT INTO audit_log (at, actor, action, account_id, key_id, key_prefix, remote_addr, reason, details)
		VALUES ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6, ''), $7, $8, $9)`
	for k, f := range pending {
		d, _ := json.Marshal(map[string]any{"count": f.count, "first_at": f.first.UTC(), "last_at": f.last.UTC()})
		batch.Queue(q, f.first, k.actor, k.action, k.account, k.key, k.prefix, k.remote, k.reason, d)
	}
	if over != nil {
		d, _ := json.Marshal(map[string]any{"count": over.count, "first_at": over.first.UTC(), "last_at": over.last.UTC()})
		batch.Queue(q, over.first, "api", edge.ActionAuthFailed, "", "", "", "", "overflow: too many distinct failures in one interval", d)
	}
	if err := w.pool.SendBatch(ctx, batch).Close(); err != nil {
		w.log.Error("write audit rows", "rows", batch.Len(), "err", err)
		return
	}
	w.rows.Add(float64(batch.Len()))
}

// Close flushes what is pending and stops the writer.
func (w *AuditWriter) Close() error {
	w.once.Do(func() { close(w.stop) })
	<-w.done
	return nil
}
