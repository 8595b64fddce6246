package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
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
// key costs one row per interval with its count. The prefix is the
// caller's to choose, so past MaxPerRemote distinct rows from one network
// in an interval (an IPv4 address, or an IPv6 /48: one host has a whole
// /64, and one site a /48, to pick source addresses from), that network's
// further failures fold by (action, network, reason) alone, and one client
// cannot crowd out the others. At most MaxDistinct rows are written per
// interval, of which failures that name no account may take all but
// KeyedReserve, kept for those against real keys (expired, revoked); the
// rest fold into one overflow row per action. A failed write puts its rows
// back for the next flush. Record never blocks on the database.
type AuditWriter struct {
	pool     *pgxpool.Pool
	log      *slog.Logger
	interval time.Duration

	mu       sync.Mutex
	pending  map[foldKey]*folded
	byRemote map[string]int

	rows      prometheus.Counter
	dropped   prometheus.Counter
	writeErrs prometheus.Counter
	stop      chan struct{}
	done      chan struct{}
	once      sync.Once
	// finalWait bounds how long Close keeps trying to write what is
	// pending (finalFlushWait); closeErr is what it could not.
	finalWait time.Duration
	closeErr  error
}

// finalFlushWait is how long Close keeps trying to write the pending rows
// while the database does not take them (a restart, a failover): a
// stopping process has no later flush to leave them to.
const finalFlushWait = 10 * time.Second

// finalFlushRetry is the pause between two of those tries.
const finalFlushRetry = 250 * time.Millisecond

// MaxDistinct bounds the audit rows written per flush interval.
const MaxDistinct = 1000

// KeyedReserve is the part of MaxDistinct that only rows naming an account
// may take: made-up keys, from however many networks, cannot push out the
// failures against real ones.
const KeyedReserve = 200

// MaxPerRemote bounds the distinct rows one remote address gets per flush
// interval before its failures fold without their key prefix.
const MaxPerRemote = 20

// overflowReason marks the rows that fold what MaxDistinct left out.
const overflowReason = "overflow: too many distinct failures in one interval"

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
		pool: pool, log: log, interval: interval, pending: map[foldKey]*folded{}, byRemote: map[string]int{},
		rows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_audit_rows_total", Help: "Failed-authentication audit rows written.",
		}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_audit_overflow_total", Help: "Failed authentications folded into overflow rows.",
		}),
		writeErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_audit_write_errors_total", Help: "Failed writes of audit rows (their rows are kept for the next flush).",
		}),
		stop: make(chan struct{}), done: make(chan struct{}), finalWait: finalFlushWait,
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{w.rows, w.dropped, w.writeErrs} {
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
	w.mu.Lock()
	defer w.mu.Unlock()
	w.add(k, folded{first: ev.At, last: ev.At, count: max(ev.Count, 1)})
}

// add folds f into the pending rows under k, or under a coarser key when k
// would pass one of the bounds. w.mu is held.
func (w *AuditWriter) add(k foldKey, f folded) {
	network := remoteNetwork(k.remote)
	// A row naming an account is a failure against a real key (expired,
	// revoked), which no caller can make up: it is counted apart from its
	// network's made-up ones. Past the bound for its key it keeps its
	// account and key and loses its address; short of that, past the bound
	// for its network (other real keys tried from there), it loses its
	// address to its network's. One key, however many addresses it is
	// tried from, costs at most MaxPerRemote + 1 rows, and no failure of a
	// real key is folded out of the log by made-up ones, nor by another
	// key's.
	bound, keyBound := network, ""
	if k.account != "" {
		bound, keyBound = "key\x00"+network, "acct\x00"+k.account+"\x00"+k.key
	}
	if w.pending[k] == nil && k.reason != overflowReason {
		switch {
		case keyBound != "" && w.byRemote[keyBound] >= MaxPerRemote:
			k.remote = ""
		case w.byRemote[bound] >= MaxPerRemote:
			if k.account == "" {
				k.prefix, k.key = "", ""
			}
			k.remote = network
		}
	}
	limit := MaxDistinct - KeyedReserve
	if k.account != "" {
		limit = MaxDistinct
	}
	if w.pending[k] == nil && k.reason != overflowReason && len(w.pending) >= limit {
		w.dropped.Add(float64(f.count))
		k = foldKey{action: k.action, actor: k.actor, reason: overflowReason}
	}
	p := w.pending[k]
	if p == nil {
		p = &folded{first: f.first, last: f.last}
		w.pending[k] = p
		if k.reason != overflowReason {
			w.byRemote[bound]++
			if keyBound != "" {
				w.byRemote[keyBound]++
			}
		}
	}
	if f.first.Before(p.first) {
		p.first = f.first
	}
	if f.last.After(p.last) {
		p.last = f.last
	}
	p.count += f.count
}

func (w *AuditWriter) run() {
	defer close(w.done)
	// A periodic flush has a deadline and ends when Close is called: one
	// waiting on a database gone silent (a failover, a dead host) held
	// the final flush, and Close with it, until TCP gave up, minutes
	// later, and the edge's stop never reached its usage events.
	stopping, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-w.stop:
			cancel()
		case <-stopping.Done():
		}
	}()
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			ctx, done := context.WithTimeout(stopping, max(w.interval, minFlushWait))
			_ = w.Flush(ctx)
			done()
		case <-w.stop:
			w.closeErr = w.finalFlush()
			return
		}
	}
}

// minFlushWait is the least a periodic flush may wait for the database.
const minFlushWait = 2 * time.Second

// finalFlush writes the pending rows, trying again until finalWait has
// passed, and reports how many it could not.
func (w *AuditWriter) finalFlush() error {
	ctx, cancel := context.WithTimeout(context.Background(), w.finalWait)
	defer cancel()
	for {
		err := w.Flush(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			w.mu.Lock()
			lost := len(w.pending)
			w.mu.Unlock()
			w.log.Error("audit rows not written at shutdown: the database did not take them", "rows", lost, "err", err)
			return fmt.Errorf("%d audit rows not written: %w", lost, err)
		case <-time.After(finalFlushRetry):
		}
	}
}

// Flush writes the pending rows now. When the write fails, they are kept
// for the next flush and the error is returned.
func (w *AuditWriter) Flush(ctx context.Context) error {
	w.mu.Lock()
	pending := w.pending
	w.pending, w.byRemote = map[foldKey]*folded{}, map[string]int{}
	w.mu.Unlock()
	if len(pending) == 0 {
		return nil
	}
	batch := &pgx.Batch{}
	const q = `INSERT INTO audit_log (at, actor, action, account_id, key_id, key_prefix, remote_addr, reason, details)
		VALUES ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6, ''), $7, $8, $9)`
	for k, f := range pending {
		d, _ := json.Marshal(map[string]any{"count": f.count, "first_at": f.first.UTC(), "last_at": f.last.UTC()})
		batch.Queue(q, f.first, k.actor, k.action, k.account, k.key, k.prefix, k.remote, k.reason, d)
	}
	if err := w.pool.SendBatch(ctx, batch).Close(); err != nil {
		// A batch is one implicit transaction: none of it was written.
		// Keep the rows (within the same bounds) for the next flush.
		w.writeErrs.Inc()
		w.log.Error("write audit rows; keeping them for the next flush", "rows", batch.Len(), "err", err)
		w.mu.Lock()
		for k, f := range pending {
			w.add(k, *f)
		}
		w.mu.Unlock()
		return fmt.Errorf("write audit rows: %w", err)
	}
	w.rows.Add(float64(batch.Len()))
	return nil
}

// Close flushes what is pending and stops the writer. While the database
// does not take the rows, it keeps trying for up to 10 s (finalFlushWait),
// then reports how many it could not write.
func (w *AuditWriter) Close() error {
	w.once.Do(func() { close(w.stop) })
	<-w.done
	return w.closeErr
}

// nat64 is the well-known prefix an IPv6-only network's gateway writes
// IPv4 addresses under (RFC 6052): each is its IPv4 client's own.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// remoteNetwork is what the per-address bound counts a remote address
// under: an IPv6 address's /48 (written as a prefix, which is also what
// the network's folded rows record), the IPv4 address a NAT64 one carries,
// anything else as it is.
func remoteNetwork(remote string) string {
	a, err := netip.ParseAddr(remote)
	if err != nil {
		ap, perr := netip.ParseAddrPort(remote)
		if perr != nil {
			return remote
		}
		a = ap.Addr()
	}
	if a = a.Unmap(); !a.Is6() {
		return remote
	}
	if a = a.WithZone(""); nat64.Contains(a) {
		b := a.As16()
		return netip.AddrFrom4([4]byte(b[12:])).String()
	}
	p, err := a.WithZone("").Prefix(48)
	if err != nil {
		return remote
	}
	return p.String()
}
