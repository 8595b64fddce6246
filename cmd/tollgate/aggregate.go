package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/meter"
)

// AggregateMain serves the usage API and the meters admin API. The rollups
// themselves are recomputed by ingest as each batch lands, so that usage is
// fresh within a second; this component reads them.
type AggregateMain struct {
	log     *slog.Logger
	ch      driver.Conn
	pool    *pgxpool.Pool
	ln      net.Listener
	srv     *http.Server
	mln     net.Listener
	metrics *http.Server
	store   *aggch.Store
	meters  *aggpg.Meters
	zones   *aggpg.Zones
	rezones *aggpg.Rezones
	catalog *aggregator.Catalog
	zoneTTL time.Duration
	// rezoneSettle is the time between a rezone's two passes, a
	// time.Duration (rezoneChanged; tests change it).
	rezoneSettle atomic.Int64
	refresh      time.Duration
	bg           context.Context
	stopBg       context.CancelFunc
	// bgWork is the backfills and roll-ups running under bg; Close waits
	// for them before it closes the connections they use. bgMu guards
	// closing, after which no more are started (an admin API request
	// can outlive the server's Close).
	bgWork   sync.WaitGroup
	bgMu     sync.Mutex
	closing  bool
	config   []meter.Meter
	Registry *prometheus.Registry
	// auditor records the usage API's failed authentications.
	auditor *edgepg.AuditWriter
}

func aggregateComponent(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	m, err := NewAggregateMain(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return []named{{"aggregate", m}}, nil
}

// NewAggregateMain connects and listens on cfg.Aggregator.Listen.
func NewAggregateMain(ctx context.Context, cfg Config, log *slog.Logger) (m *AggregateMain, err error) {
	log = log.With("component", "aggregate")
	m = &AggregateMain{log: log, Registry: prometheus.NewRegistry(), refresh: cfg.Aggregator.MetersRefresh, zoneTTL: cfg.Aggregator.ZoneCacheTTL, config: cfg.Meters}
	m.rezoneSettle.Store(int64(rezoneSettle))
	m.bg, m.stopBg = context.WithCancel(context.Background())
	self := m
	defer func() {
		if err != nil {
			_ = self.Close()
		}
	}()
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if m.ch, err = openClickHouse(ctx, cfg.Services, cfg.Services.ClickHouseDatabase); err != nil {
		return nil, err
	}
	if m.pool, err = openPostgres(ctx, cfg.Services.PostgresURL); err != nil {
		return nil, err
	}
	m.meters = aggpg.NewMeters(m.pool)
	catalog, err := aggregator.NewCatalog(cfg.Meters, m.meters, cfg.Aggregator.MetersRefresh, log)
	if err != nil {
		return nil, err
	}
	m.store = aggch.NewStore(m.ch)
	m.zones = aggpg.NewZones(m.pool, cfg.Aggregator.ZoneCacheTTL, log)
	m.rezones = aggpg.NewRezones(m.pool)
	m.catalog = catalog
	if m.auditor, err = edgepg.NewAuditWriter(m.pool, time.Second, m.Registry, log); err != nil {
		return nil, err
	}
	ready := readiness(clickhouseDep(m.ch), postgresDep(m.pool))
	srv, err := aggregator.NewServer(cfg.Aggregator, aggregator.ServerDeps{Ready: ready,
		Keys: edgepg.NewKeyStore(m.pool), Usage: m.store, Catalog: catalog, Zones: m.zones,
		Holds: aggpg.NewSpoolHolds(m.pool), Backfill: m.backfill, PastRollups: m.meters, Rezones: m.rezones, Auditor: m.auditor, Registerer: m.Registry, Log: log,
	})
	if err != nil {
		return nil, err
	}
	if m.ln, err = net.Listen("tcp", cfg.Aggregator.Listen); err != nil {
		return nil, fmt.Errorf("aggregator listener: %w", err)
	}
	m.srv = &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 5 * time.Second}
	if cfg.Aggregator.MetricsListen != "" {
		if m.mln, m.metrics, err = metricsServer(cfg.Aggregator.MetricsListen, m.Registry, ready, log); err != nil {
			return nil, fmt.Errorf("aggregator metrics listener: %w", err)
		}
	}
	return m, nil
}

// backfill computes a new meter's rollups over the raw events that landed
// before it existed: once now, and again once every ingest process has
// picked the meter up, to cover events that landed in between. The first
// pass replaces whatever rows the key has: a key can be reused (a meter
// removed from the configuration file, then created here with another
// definition), and a rebuilt row replaces a stored one only when it counts
// at least as many events, so a narrower definition's rows would lose to
// the old ones. The second pass only adds: every row written since the
// first is under this definition. The meter is recorded as backfilled
// once both passes have finished, if no other aggregator claimed the
// backfill since (its first pass may have deleted rows this one wrote);
// until then every aggregator that starts backfills it again, so a
// backfill cut short (the process stopped or killed, ClickHouse down)
// does not leave the meter's past empty.
func (m *AggregateMain) backfill(mt meter.Meter) {
	m.background(func() {
		claim := uuid.New()
		claimed, err := m.claimBackfill(mt, claim)
		switch {
		case m.bg.Err() != nil:
			return
		case err != nil:
			// Better a backfill no one records (the next aggregator to
			// start does it again) than a meter without its past.
			m.log.Error("cannot claim a new meter's backfill; backfilling it unclaimed, and again when an aggregator next starts", "meter", mt.Key, "err", err)
		case !claimed:
			return // backfilled already, or no longer stored under this definition
		}
		// The first pass deletes through a store that checks the claim
		// first: a backfill another aggregator has claimed since (it
		// started meanwhile) may have written rows already.
		store := claimedStore{Store: m.store, stands: func(ctx context.Context) error {
			if err != nil {
				return nil // unclaimed
			}
			ok, cerr := m.meters.ClaimStands(ctx, mt.Key, claim)
			switch {
			case cerr != nil:
				return cerr
			case !ok:
				return errClaimTaken
			}
			return nil
		}}
		finished := true
		for i, wait := range []time.Duration{0, m.refresh + 2*time.Second} {
			select {
			case <-m.bg.Done():
				return
			case <-time.After(wait):
			}
			var perr error
			if i == 0 {
				perr = aggregator.ReplaceAll(m.bg, store, m.zones, []meter.Meter{mt}, time.Time{}, time.Time{}, m.log)
			} else {
				// After a first pass that failed part-way, this one
				// also brings back the rows it had deleted.
				perr = aggregator.RebuildAll(m.bg, m.store, m.zones, []meter.Meter{mt}, time.Time{}, time.Time{}, m.log)
			}
			switch {
			case m.bg.Err() != nil:
				return
			case errors.Is(perr, errClaimTaken):
				m.log.Info("another aggregator took this meter's backfill over", "meter", mt.Key)
				return
			case perr != nil:
				finished = false
				m.log.Error("backfill new meter; it is backfilled again when an aggregator next starts", "meter", mt.Key, "pass", i+1, "err", perr)
			}
		}
		if !finished || err != nil {
			return
		}
		switch ok, err := m.meters.Backfilled(m.bg, mt.Key, claim); {
		case err != nil:
			if m.bg.Err() == nil {
				m.log.Error("record a meter's backfill as finished; it is backfilled again when an aggregator next starts", "meter", mt.Key, "err", err)
			}
		case !ok:
			m.log.Info("another aggregator took this meter's backfill over; it records the finish", "meter", mt.Key)
		default:
			m.log.Info("meter backfilled", "meter", mt.Key)
		}
	})
}

// errClaimTaken stops a backfill that another aggregator has claimed since.
var errClaimTaken = errors.New("another aggregator claimed the backfill")

// claimedStore is the rollup store a backfill's first pass deletes
// through: it deletes only while stands says the backfill's claim still
// stands.
type claimedStore struct {
	*aggch.Store
	stands func(ctx context.Context) error
}

// DeleteRollups implements aggregator.RollupDeleter.
func (s claimedStore) DeleteRollups(ctx context.Context, meters []string, from, to time.Time) error {
	if err := s.stands(ctx); err != nil {
		return err
	}
	return s.Store.DeleteRollups(ctx, meters, from, to)
}

// claimBackfill claims mt's backfill, trying a few times over some
// seconds: a meter just created must not wait for the next start over a
// passing Postgres error.
func (m *AggregateMain) claimBackfill(mt meter.Meter, claim uuid.UUID) (bool, error) {
	var err error
	for wait := time.Second; ; wait *= 2 {
		var ok bool
		if ok, err = m.meters.ClaimBackfill(m.bg, mt, claim); err == nil || wait > 8*time.Second {
			return ok, err
		}
		select {
		case <-m.bg.Done():
			return false, m.bg.Err()
		case <-time.After(wait):
		}
	}
}

// background runs f under bgWork unless Close has begun.
func (m *AggregateMain) background(f func()) {
	m.bgMu.Lock()
	defer m.bgMu.Unlock()
	if m.closing {
		return
	}
	m.bgWork.Go(f)
}

// resumeBackfills starts again every backfill that never finished, but for
// meters whose key the configuration file now defines: the file's
// definition is the one counted, and rollUpConfigMeters computes its rows.
func (m *AggregateMain) resumeBackfills(ctx context.Context) error {
	ms, err := m.meters.Unbackfilled(ctx)
	var undecodable aggregator.UndecodableMeters
	if errors.As(err, &undecodable) {
		// The catalog leaves them out, and says so; the others resume.
		err = nil
	}
	if err != nil {
		return err
	}
	for _, mt := range ms {
		if slices.ContainsFunc(m.config, func(c meter.Meter) bool { return c.Key == mt.Key }) {
			continue
		}
		m.log.Warn("meter whose backfill never finished; backfilling it again", "meter", mt.Key)
		m.backfill(mt)
	}
	return nil
}

// rollUpConfigMeters brings the rollups of the configuration file's meters
// in line with their definitions, in the background: a meter new to the
// file and one whose definition changed both have their rows replaced from
// the raw events. A new one may have rows too, under another definition: a
// meter created through the admin API that the file now defines under its
// key. Rebuilt rows replace stored ones only where they count at least as
// many events, so without the deletion the old rows would stay beside the
// new, and coarser windows would mix the two. Two passes, as for a
// backfill, so events that ingest processes still holding the old
// definition rolled up in between are redone; the definition is recorded
// after the second.
func (m *AggregateMain) rollUpConfigMeters(config []meter.Meter, store *aggpg.Meters) {
	m.background(func() {
		added, changed, err := store.ConfigState(m.bg, config)
		if err != nil {
			m.log.Error("cannot tell whether the configured meters changed; their rollups are left as they are", "err", err)
			return
		}
		stale := slices.Concat(added, changed)
		if len(stale) == 0 {
			return
		}
		for _, mt := range added {
			m.log.Info("meter new to the configuration; computing its rollups from the raw events (replacing any its key has from another definition; an ingest process still on a file defining it otherwise will write that definition's rows)", "meter", mt.Key)
		}
		for _, mt := range changed {
			m.log.Warn("meter definition changed in the configuration; replacing its rollups (replays of invoices made under the old definition will differ; an ingest process still on the old file will write old-definition rows: restart every one with this file)", "meter", mt.Key)
		}
		for i, wait := range []time.Duration{0, m.refresh + 2*time.Second} {
			select {
			case <-m.bg.Done():
				return
			case <-time.After(wait):
			}
			if err := aggregator.ReplaceAll(m.bg, m.store, m.zones, stale, time.Time{}, time.Time{}, m.log); err != nil {
				m.log.Error("replace the rollups of meters new to or changed in the configuration", "pass", i+1, "err", err)
				return
			}
		}
		for _, mt := range stale {
			if err := store.ConfigRolledUp(m.bg, mt); err != nil {
				m.log.Error("record a configured meter's definition", "meter", mt.Key, "err", err)
			}
		}
	})
}

// rezoneChanged re-rolls, in the background, the hour, day and month
// rollups of every account whose time zone changed (aggregator.Rezone), as
// long as the process runs, in two passes:
//
//   - The first comes zone_cache_ttl plus 2 s after this process first sees
//     the change. By then every ingest process reads the new zone. It is
//     recorded in Postgres, so that one aggregator runs it.
//   - The second comes rezoneSettle after the first, by Postgres's clock,
//     run by whichever aggregator looks first. A rollup round an ingest
//     process planned with the old zone just before it saw the change can
//     still be writing its day and month rows (rounds queue between their
//     stages), on the old grid, after the first pass's deletion; the second
//     pass replaces them. Only then is the change recorded as done.
//
// A pass that fails is tried again later, backing off per account; a pass
// cut short (the process stopped or killed) is run again by the next
// aggregator to look.
func (m *AggregateMain) rezoneChanged() {
	m.background(func() {
		every := min(5*time.Second, m.zoneTTL)
		t := time.NewTicker(every)
		defer t.Stop()
		seen := map[string]*rezoneSeen{}
		for {
			m.rezoneDue(seen)
			select {
			case <-m.bg.Done():
				return
			case <-t.C:
			}
		}
	})
}

// rezoneSettle is how long the second pass of a rezone comes after the
// first (rezoneChanged).
const rezoneSettle = 30 * time.Second

// rezonePassLimit bounds one rezone pass: its deletion and its rebuild.
const rezonePassLimit = 30 * time.Minute

// rezoneSeen is an owed rezone this process has seen: the change's time,
// when this process may next run a pass of it (first: once every process
// reads the new zone; after a failure: once its backoff is over), and
// failures in a row.
type rezoneSeen struct {
	changedAt time.Time
	due       time.Time
	failures  int
}

// rezoneDue runs the owed rezone passes that are due.
func (m *AggregateMain) rezoneDue(seen map[string]*rezoneSeen) {
	owed, err := m.rezones.Owed(m.bg)
	if err != nil {
		if m.bg.Err() != nil {
			return // stopping
		}
		m.log.Error("cannot list the accounts whose time zone changed; their rollups are re-rolled on a later look", "err", err)
		return
	}
	now := time.Now()
	still := map[string]bool{}
	for _, o := range owed {
		still[o.Account] = true
		s := seen[o.Account]
		if s == nil || !s.changedAt.Equal(o.ChangedAt) {
			wait := m.zoneTTL + 2*time.Second
			seen[o.Account] = &rezoneSeen{changedAt: o.ChangedAt, due: now.Add(wait)}
			if o.FirstPassAgo == nil {
				m.log.Info("account time zone changed; its hour, day and month rollups are re-rolled once every process reads the new zone",
					"account", o.Account, "timezone", o.Zone, "changed_at", o.ChangedAt, "after", wait)
			}
			continue
		}
		second := o.FirstPassAgo != nil
		if now.Before(s.due) || second && *o.FirstPassAgo < time.Duration(m.rezoneSettle.Load()) {
			continue
		}
		switch result, err := m.rezone(o, second); {
		case err != nil:
			if m.bg.Err() != nil {
				return // stopping: still owed, to the next aggregator
			}
			// Each pass deletes rows with a ClickHouse mutation: a pass
			// that keeps failing is not tried every few seconds.
			s.failures++
			backoff := min(5*time.Second<<min(s.failures, 7), 5*time.Minute)
			s.due = time.Now().Add(backoff) // from the failure: a pass can take minutes
			pass := 1
			if second {
				pass = 2
			}
			m.log.Error("re-roll an account's rollups onto its new time zone", "account", o.Account, "timezone", o.Zone,
				"pass", pass, "retry_in", backoff, "err", err)
		case result == rezoneGone:
			delete(seen, o.Account)
		case result == rezoneDone:
			s.failures = 0
			if second {
				delete(seen, o.Account)
			}
		}
		// rezoneBusy: another aggregator is at it; look again later.
	}
	for a := range seen {
		if !still[a] {
			delete(seen, a) // done by another aggregator
		}
	}
}

// rezoneResult is what one rezone pass came to.
type rezoneResult int

const (
	rezoneDone rezoneResult = iota // the pass ran
	rezoneBusy                     // another aggregator holds the account's rezone, or has run this pass
	rezoneGone                     // no longer owed: done elsewhere, or the zone changed again
)

// rezone runs one pass of an owed rezone under the account's lock: the
// first, or the second, which records the rezone done.
func (m *AggregateMain) rezone(o aggpg.Owed, second bool) (rezoneResult, error) {
	lock, ok, err := m.rezones.Lock(m.bg, o.Account)
	if err != nil {
		return rezoneBusy, err
	}
	if !ok {
		return rezoneBusy, nil
	}
	defer lock.Release()
	owed, firstRun, err := lock.Owed(m.bg, o.ChangedAt)
	switch {
	case err != nil:
		return rezoneBusy, err
	case !owed:
		return rezoneGone, nil
	case firstRun != second:
		return rezoneBusy, nil // another aggregator ran the first pass meanwhile
	}
	meters, err := m.catalog.Meters(m.bg)
	if err != nil {
		return rezoneDone, err
	}
	// The zone as read with the change, not through the cache: the
	// account's zone as of o.ChangedAt, which lock.Owed says still holds.
	zones := aggregator.StaticZones{o.Account: o.Zone}
	// A pass that cannot finish (a ClickHouse mutation stuck behind a
	// failing one) ends as an error, and backs off, rather than holding
	// the account's lock, and every other account's rezone, for good.
	ctx, cancel := context.WithTimeout(m.bg, rezonePassLimit)
	defer cancel()
	if err := aggregator.Rezone(ctx, m.store, zones, meters, o.Account, m.log); err != nil {
		return rezoneDone, err
	}
	if !second {
		if err := lock.FirstPassRun(m.bg, o.ChangedAt); err != nil {
			return rezoneDone, err
		}
		m.log.Info("account rollups re-rolled onto its time zone; once more after the rounds under way have landed",
			"account", o.Account, "timezone", o.Zone, "meters", len(meters), "again_in", time.Duration(m.rezoneSettle.Load()))
		return rezoneDone, nil
	}
	if err := lock.Done(m.bg, o.ChangedAt); err != nil {
		return rezoneDone, err
	}
	m.log.Info("account rollups re-rolled onto its time zone", "account", o.Account, "timezone", o.Zone, "meters", len(meters))
	return rezoneDone, nil
}

// Addr is the address the usage API listens on.
func (m *AggregateMain) Addr() string { return m.ln.Addr().String() }

// MetricsAddr is the /metrics listener's address ("" without one).
func (m *AggregateMain) MetricsAddr() string {
	if m.mln == nil {
		return ""
	}
	return m.mln.Addr().String()
}

// Run serves until ctx ends.
func (m *AggregateMain) Run(ctx context.Context) error {
	m.log.Info("usage API listening", "addr", m.Addr())
	// Started here, not by NewAggregateMain: both begin by deleting rows,
	// and a process whose other components then failed to start would
	// stop them right after. First the record of what each key's rows were
	// computed under is brought in line with the meters now in force.
	if forgotten, again, err := m.meters.Reconcile(ctx, m.config); err != nil {
		m.log.Error("cannot tell which meters' rollups were computed under another definition; they are left as they are", "err", err)
	} else {
		for _, k := range forgotten {
			m.log.Info("meter key no longer defined; should a meter be given it again, its rollups are computed anew", "meter", k)
		}
		for _, k := range again {
			m.log.Warn("stored meter no longer shadowed by the configuration file, whose definition its rollups were computed under; backfilling it", "meter", k)
		}
	}
	if pending, err := m.meters.PendingRebuilds(ctx); err != nil {
		m.log.Error("cannot read the rollup rebuilds that never finished", "err", err)
	} else {
		for _, p := range pending {
			args := []string{"tollgate", "aggregate", "rebuild", "--from", p.From.UTC().Format(time.RFC3339Nano), "--to", p.To.UTC().Format(time.RFC3339Nano)}
			for _, k := range p.Meters {
				args = append(args, "--meter", k)
			}
			m.log.Error("a rollup rebuild deleted rows and never recorded them rebuilt (it was killed, or is still running); until it is run again the usage API reports its meters as backfilling",
				"meters", p.Meters, "from", p.From, "to", p.To, "started_at", p.StartedAt, "run", strings.Join(args, " "))
		}
	}
	if err := m.resumeBackfills(ctx); err != nil {
		m.log.Error("cannot list the meters whose backfill never finished; they are backfilled when an aggregator next starts", "err", err)
	}
	m.rollUpConfigMeters(m.config, m.meters)
	m.rezoneChanged()
	if m.metrics != nil {
		m.log.Info("metrics listening", "addr", m.MetricsAddr())
		go func() {
			if err := m.metrics.Serve(m.mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				m.log.Error("aggregator metrics server", "err", err)
			}
		}()
	}
	errc := make(chan error, 1)
	go func() { errc <- m.srv.Serve(m.ln) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if m.metrics != nil {
			_ = m.metrics.Shutdown(sctx)
		}
		return m.srv.Shutdown(sctx)
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	}
}

// Close stops background work and closes connections.
func (m *AggregateMain) Close() error {
	m.stopBg()
	var errs []error
	if m.metrics != nil {
		errs = append(errs, m.metrics.Close())
	}
	if m.mln != nil {
		_ = m.mln.Close() // the server closed it if it ever served
	}
	if m.srv != nil {
		errs = append(errs, m.srv.Close())
	} else if m.ln != nil {
		errs = append(errs, m.ln.Close())
	}
	m.bgMu.Lock()
	m.closing = true
	m.bgMu.Unlock()
	m.bgWork.Wait() // bg is cancelled: they stop at their next step
	if m.auditor != nil {
		errs = append(errs, m.auditor.Close()) // its last rows, before the pool goes
	}
	if m.ch != nil {
		errs = append(errs, m.ch.Close())
	}
	if m.pool != nil {
		m.pool.Close()
	}
	return errors.Join(errs...)
}

// aggregateCommand is `tollgate aggregate` with its `rebuild` sub-command.
func aggregateCommand(g *globalFlags) *cobra.Command {
	c := componentCommand(g, "aggregate", "Serve the usage API and the meters admin API", aggregateComponent)
	c.AddCommand(rebuildCommand(g))
	return c
}

func rebuildCommand(g *globalFlags) *cobra.Command {
	var meterKeys []string
	var from, to string
	c := &cobra.Command{
		Use:   "rebuild",
		Short: "Recompute rollups from the raw events",
		Long: `Recompute rollups from the raw events (usage_events FINAL) for every window
that starts in [--from, --to) (default: all raw events), for the given meters
(default: all). Safe to run while ingest runs: rows are versioned by the number
of events they were computed from, so the most complete computation wins.

The meters' rows in the range are deleted first, then rebuilt level by level;
the usage API finds nothing there in between. Stopped by SIGINT or SIGTERM (or
a failure) before the deletion, nothing has changed; after it, the command
exits non-zero and prints the rebuild to run again, which the range then needs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, log, err := loadFor(g, "aggregate")
			if err != nil {
				return err
			}
			var f, t time.Time
			if from != "" {
				if f, err = time.Parse(time.RFC3339, from); err != nil {
					return fmt.Errorf("--from: want RFC 3339: %w", err)
				}
			}
			if to != "" {
				if t, err = time.Parse(time.RFC3339, to); err != nil {
					return fmt.Errorf("--to: want RFC 3339: %w", err)
				}
			}
			if !f.IsZero() && !t.IsZero() && !f.Before(t) {
				return fmt.Errorf("--from %s is not before --to %s: the range is empty", from, to)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			context.AfterFunc(ctx, stop) // a second signal ends the process (main)
			ch, err := openClickHouse(ctx, cfg.Services, cfg.Services.ClickHouseDatabase)
			if err != nil {
				return err
			}
			defer ch.Close()
			pool, err := openPostgres(ctx, cfg.Services.PostgresURL)
			if err != nil {
				return err
			}
			defer pool.Close()
			catalog, err := aggregator.NewCatalog(cfg.Meters, aggpg.NewMeters(pool), cfg.Aggregator.MetersRefresh, log)
			if err != nil {
				return err
			}
			meters, err := catalog.Meters(ctx)
			if err != nil {
				return err
			}
			if len(meterKeys) > 0 {
				var sel []meter.Meter
				for _, k := range meterKeys {
					mt, err := catalog.Get(ctx, k)
					if err != nil {
						return err
					}
					sel = append(sel, mt)
				}
				meters = sel
			}
			// The deletion is recorded in Postgres first, so a rebuild
			// killed after it (SIGKILL, a lost host), which cannot say so
			// itself, leaves a record: the usage API reports the meters as
			// backfilling, and an aggregator that starts names the rebuild
			// to run again.
			record := aggpg.NewMeters(pool)
			store := &deleteWatch{Store: aggch.NewStore(ch), id: uuid.New(), record: record}
			err = aggregator.ReplaceAll(ctx, store, aggpg.NewZones(pool, time.Minute, log), meters, f, t, log)
			if err != nil {
				return rebuildFailed(ctx, log, store, meters, err)
			}
			if deleted, started, keys, from, to := store.deletion(); deleted {
				if err := record.RebuildFinished(ctx, store.id, started, keys, from, to); err != nil {
					return fmt.Errorf("the rollups are rebuilt, but recording it failed (the usage API reports the meters as backfilling until a rebuild of the same range records it): %w", err)
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rebuilt rollups of %d meter(s)\n", len(meters))
			return nil
		},
	}
	c.Flags().StringSliceVar(&meterKeys, "meter", nil, "meter key to rebuild (repeatable; default all)")
	c.Flags().StringVar(&from, "from", "", "first window start to rebuild, RFC 3339 (default: first raw event)")
	c.Flags().StringVar(&to, "to", "", "rebuild windows starting before this, RFC 3339 (default: after the last raw event)")
	return c
}

// deleteWatch is the rollup store, noting whether a deletion was issued:
// once it is, ClickHouse applies it even if the wait for it is cut short.
type deleteWatch struct {
	*aggch.Store
	// id names the rebuild in record (rollup_rebuilds), where the deletion
	// is recorded before it is issued.
	id       uuid.UUID
	record   *aggpg.Meters
	mu       sync.Mutex
	deleted  bool
	started  time.Time // by Postgres's clock, as recorded
	meters   []string
	from, to time.Time
}

func (w *deleteWatch) DeleteRollups(ctx context.Context, meters []string, from, to time.Time) error {
	if len(meters) > 0 {
		started, err := w.record.RebuildStarting(ctx, w.id, meters, from, to)
		if err != nil {
			return err // nothing deleted
		}
		w.mu.Lock()
		w.deleted, w.started, w.meters, w.from, w.to = true, started, slices.Clone(meters), from, to
		w.mu.Unlock()
	}
	return w.Store.DeleteRollups(ctx, meters, from, to)
}

// deletion reports whether a deletion was issued, when it was recorded,
// of which meters' rows and for which windows.
func (w *deleteWatch) deletion() (deleted bool, started time.Time, meters []string, from, to time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.deleted, w.started, w.meters, w.from, w.to
}

// rebuildFailed explains a rebuild that stopped (err): whether the rollups
// it was replacing are still there, or gone until the range is rebuilt.
func rebuildFailed(ctx context.Context, log *slog.Logger, w *deleteWatch, meters []meter.Meter, err error) error {
	stopped := "failed"
	if ctx.Err() != nil {
		stopped = "was interrupted"
	}
	w.mu.Lock()
	deleted, from, to := w.deleted, w.from, w.to
	w.mu.Unlock()
	if !deleted {
		return fmt.Errorf("the rebuild %s before any rollup was deleted; the rollups are as they were: %w", stopped, err)
	}
	again := []string{"tollgate", "aggregate", "rebuild", "--from", from.UTC().Format(time.RFC3339Nano), "--to", to.UTC().Format(time.RFC3339Nano)}
	keys := make([]string, len(meters))
	for i, m := range meters {
		keys[i] = m.Key
		again = append(again, "--meter", m.Key)
	}
	log.Error("rollups deleted and not all rebuilt; the range must be rebuilt again", "meters", keys, "from", from, "to", to, "err", err)
	return fmt.Errorf("the rebuild %s after it deleted the rollups of %s for the windows starting in [%s, %s): "+
		"the usage API finds part or none of the usage there until this completes (with the same configuration):\n  %s\n%w",
		stopped, strings.Join(keys, ", "), from.UTC().Format(time.RFC3339), to.UTC().Format(time.RFC3339), strings.Join(again, " "), err)
}
