// Package aggregator rolls raw usage events into per-window rollups and
// serves them through the usage API.
//
// Rollups are recomputed, never incremented: when events land in a window,
// the window's row is computed again from the deduplicated raw events
// (`usage_events FINAL`) and written with the number of events it saw as its
// version. The same meter SQL (meter.Compile) that the invoicer uses
// computes it, so a dashboard and an invoice cannot disagree, a duplicate
// never counts twice and a late event updates its window exactly once.
package aggregator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Touched is one minute of one account environment that new events fell in.
type Touched struct {
	Account     string
	Environment schemas.Environment
	Minute      time.Time
}

// Recompute asks for every window of one granularity that holds one of the
// touched minutes to be computed again, for accounts that share Zone.
type Recompute struct {
	Meter       meter.Meter
	Granularity Granularity
	Zone        string
	Touched     []Touched
}

// Rebuild asks for every window of one granularity starting in [From, To)
// to be computed again for the given accounts, which share Zone.
type Rebuild struct {
	Meter       meter.Meter
	Granularity Granularity
	Zone        string
	Accounts    []string
	From, To    time.Time
}

// RollupStore computes and stores rollups.
type RollupStore interface {
	// CheckZone tells whether windows can be computed in a zone; accounts
	// in one it refuses are rolled up in UTC.
	ZoneChecker
	// Recompute handles requests of one granularity together.
	Recompute(ctx context.Context, rs []Recompute) error
	// Rebuild handles requests that share their granularity, zone,
	// accounts and range together.
	Rebuild(ctx context.Context, rs []Rebuild) error
	// Accounts lists the accounts with raw events in [from, to).
	Accounts(ctx context.Context, from, to time.Time) ([]string, error)
	// EventRange is the first and last event time in the raw table.
	EventRange(ctx context.Context) (first, last time.Time, ok bool, err error)
}

// Zones maps accounts to their IANA time zone; accounts it does not know
// are in UTC.
type Zones interface {
	Zones(ctx context.Context, accounts []string) (map[string]string, error)
}

// MeterSource lists the meters in force.
type MeterSource interface {
	Meters(ctx context.Context) ([]meter.Meter, error)
}

// Roller keeps rollups up to date as events land. It implements
// ingest.Rollups, so ingest calls it before committing a batch's offsets.
type Roller struct {
	meters MeterSource
	zones  Zones
	store  RollupStore
	log    *slog.Logger
}

var _ ingest.Rollups = (*Roller)(nil)

// NewRoller returns a Roller. Accounts whose zone the store refuses are
// rolled up in UTC, with a warning.
func NewRoller(meters MeterSource, zones Zones, store RollupStore, log *slog.Logger) *Roller {
	return &Roller{meters: meters, zones: checkZones(zones, store, log), store: store, log: log}
}

// Landed recomputes every window the records fall in, for every meter that
// selects their event type, at every granularity. Recomputing is
// idempotent, so a redelivered batch does no harm.
func (r *Roller) Landed(ctx context.Context, records []ingest.Record) error {
	levels, err := r.plan(ctx, [][]ingest.Record{records})
	if err != nil {
		return err
	}
	for _, l := range levels {
		if len(l) == 0 {
			continue
		}
		if err := r.store.Recompute(ctx, l); err != nil {
			return err
		}
	}
	return nil
}

// plan is the store requests for records, one slice per granularity in
// Granularities order.
func (r *Roller) plan(ctx context.Context, groups [][]ingest.Record) ([][]Recompute, error) {
	meters, err := r.meters.Meters(ctx)
	if err != nil {
		return nil, err
	}
	// Touched minutes per event type, then per meter.
	byType := map[string]map[Touched]struct{}{}
	accounts := map[string]struct{}{}
	for _, records := range groups {
		for i := range records {
			e := &records[i].Event
			set := byType[e.Type]
			if set == nil {
				set = map[Touched]struct{}{}
				byType[e.Type] = set
			}
			set[Touched{Account: e.AccountID, Environment: e.Environment, Minute: e.Time.UTC().Truncate(time.Minute)}] = struct{}{}
			accounts[e.AccountID] = struct{}{}
		}
	}
	zones, err := r.zones.Zones(ctx, keys(accounts))
	if err != nil {
		return nil, err
	}
	// Each level is computed from the one before it, so the levels run in
	// order; each level is one request to the store for every meter and zone.
	levels := make([][]Recompute, len(Granularities))
	for _, m := range meters {
		set := byType[m.EventType]
		if len(set) == 0 {
			continue
		}
		// Minutes are the same in every zone: one minute request per
		// meter, so its raw events are scanned once for every account.
		all := make([]Touched, 0, len(set))
		byZone := map[string][]Touched{}
		for t := range set {
			z := zones[t.Account]
			if z == "" {
				z = "UTC"
			}
			byZone[z] = append(byZone[z], t)
			all = append(all, t)
		}
		sort.Slice(all, func(i, j int) bool { return lessTouched(all[i], all[j]) })
		levels[0] = append(levels[0], Recompute{Meter: m, Granularity: Minute, Zone: "UTC", Touched: all})
		for _, z := range keys(byZone) {
			ts := byZone[z]
			sort.Slice(ts, func(i, j int) bool { return lessTouched(ts[i], ts[j]) })
			for i, g := range Granularities[1:] {
				levels[i+1] = append(levels[i+1], Recompute{Meter: m, Granularity: g, Zone: z, Touched: ts})
			}
		}
	}
	return levels, nil
}

// RebuildAll recomputes the rollups of the given meters for every window
// that starts in [from, to): every minute window first (from the raw
// events), then every hour, day and month window (each from the level
// below), one UTC month at a time. A zero from or to means the first or
// last raw event.
func RebuildAll(ctx context.Context, store RollupStore, zones Zones, meters []meter.Meter, from, to time.Time, log *slog.Logger) error {
	from, to, ok, err := rebuildRange(ctx, store, from, to)
	if err != nil || !ok {
		return err
	}
	return rebuildLevels(ctx, store, zones, meters, Granularities, nil, from, to, log)
}

// RollupDeleter deletes rollup rows, for a rebuild that replaces them.
type RollupDeleter interface {
	// DeleteRollups deletes the rows of meters, at every granularity,
	// whose windows start in [from, to), and returns once they are gone.
	DeleteRollups(ctx context.Context, meters []string, from, to time.Time) error
}

// ReplaceAll is RebuildAll for rows that a rebuild may not reach by
// itself: it first deletes every row of the meters whose window starts in
// the range, then rebuilds. Rebuilt rows replace stored ones only where
// they count at least as many events (the table's version), and sit at the
// same window starts; after a meter's definition changed (a narrower
// filter counts fewer events) or an account's time zone did (its day and
// month windows start elsewhere), the old rows would otherwise stay. Reads
// of those windows find nothing between the deletion and their rebuild.
func ReplaceAll(ctx context.Context, store interface {
	RollupStore
	RollupDeleter
}, zones Zones, meters []meter.Meter, from, to time.Time, log *slog.Logger) error {
	from, to, ok, err := rebuildRange(ctx, store, from, to)
	if err != nil || !ok {
		return err
	}
	keys := make([]string, len(meters))
	for i, m := range meters {
		keys[i] = m.Key
	}
	if err := store.DeleteRollups(ctx, keys, from, to); err != nil {
		return err
	}
	log.Info("deleted the rollups to rebuild", "meters", len(keys), "from", from, "to", to)
	return rebuildLevels(ctx, store, zones, meters, Granularities, nil, from, to, log)
}

// CoarseRollupStore is what a rezone needs beyond a RollupStore.
type CoarseRollupStore interface {
	RollupStore
	// AccountMinutes is the first and last window start of account's
	// minute rows; ok is false when it has none.
	AccountMinutes(ctx context.Context, account string) (first, last time.Time, ok bool, err error)
	// DeleteCoarseRollups deletes account's hour, day and month rows of
	// meters, and returns once they are gone.
	DeleteCoarseRollups(ctx context.Context, account string, meters []string) error
}

// Rezone re-rolls account's hour, day and month windows of meters onto the
// grid of its zone as zones give it now: it deletes them, then rebuilds
// them from its minute rows, which a zone change does not move. Without
// it the account's coarser windows hold rows on both zones' grids, and a
// day or month counts the hours of both. Reads of those windows find
// nothing between the deletion and their rebuild. Every process that rolls
// up must have the new zone first, or it writes rows on the old grid again.
func Rezone(ctx context.Context, store CoarseRollupStore, zones Zones, meters []meter.Meter, account string, log *slog.Logger) error {
	keys := make([]string, len(meters))
	for i, m := range meters {
		keys[i] = m.Key
	}
	if err := store.DeleteCoarseRollups(ctx, account, keys); err != nil {
		return err
	}
	// The range is read after the deletion: a minute that landed before
	// it had its coarser rows deleted with the rest, and is rebuilt; one
	// that lands after it writes rows the deletion does not touch.
	first, last, ok, err := store.AccountMinutes(ctx, account)
	if err != nil || !ok {
		return err
	}
	// A month window can start up to a day before its first minute (east
	// of UTC) and the last one ends after its last.
	from, to := first.Add(-MaxSpan(Month)), last.Add(time.Minute)
	return rebuildLevels(ctx, store, zones, meters, Granularities[1:], []string{account}, from, to, log)
}

// rebuildRange fills a zero from or to from the raw events' range; ok is
// false when there are no raw events.
func rebuildRange(ctx context.Context, store RollupStore, from, to time.Time) (time.Time, time.Time, bool, error) {
	first, last, ok, err := store.EventRange(ctx)
	if err != nil || !ok {
		return from, to, false, err
	}
	if from.IsZero() {
		from = first.Add(-32 * 24 * time.Hour)
	}
	if to.IsZero() {
		to = last.Add(32 * 24 * time.Hour)
	}
	return from, to, true, nil
}

// rebuildLevels rebuilds levels in order; only, when not nil, are the
// accounts rebuilt (otherwise every account with raw events).
func rebuildLevels(ctx context.Context, store RollupStore, zones Zones, meters []meter.Meter, levels []Granularity, only []string, from, to time.Time, log *slog.Logger) error {
	zones = checkZones(zones, store, log)
	for _, g := range levels {
		if err := rebuildLevel(ctx, store, zones, meters, g, only, from, to, log); err != nil {
			return err
		}
	}
	return nil
}

func rebuildLevel(ctx context.Context, store RollupStore, zones Zones, meters []meter.Meter, g Granularity, only []string, from, to time.Time, log *slog.Logger) error {
	for m := monthStart(from); m.Before(to); m = m.AddDate(0, 1, 0) {
		lo, hi := m, m.AddDate(0, 1, 0)
		if lo.Before(from) {
			lo = from
		}
		if hi.After(to) {
			hi = to
		}
		// Accounts with events in any window that may start this month.
		accounts := only
		if accounts == nil {
			var err error
			if accounts, err = store.Accounts(ctx, lo.Add(-MaxSpan(Month)), hi.Add(MaxSpan(Month))); err != nil {
				return err
			}
		}
		if len(accounts) == 0 {
			continue
		}
		zs, err := zones.Zones(ctx, accounts)
		if err != nil {
			return err
		}
		byZone := map[string][]string{}
		for _, a := range accounts {
			z := zs[a]
			if z == "" {
				z = "UTC"
			}
			byZone[z] = append(byZone[z], a)
		}
		// One job per zone (and per rebuildAccounts of its accounts, so
		// the statement's account list stays well inside ClickHouse's
		// max_query_size): the store reads each zone's raw events or finer
		// rows once for every meter.
		var jobs [][]Rebuild
		for z, all := range byZone {
			for as := range slices.Chunk(all, rebuildAccounts) {
				var zoneJobs []Rebuild
				for _, mt := range meters {
					zoneJobs = append(zoneJobs, Rebuild{Meter: mt, Granularity: g, Zone: z, Accounts: as, From: lo, To: hi})
				}
				jobs = append(jobs, zoneJobs)
			}
		}
		if err := runAll(ctx, jobs, 2, store.Rebuild); err != nil {
			return err
		}
		if only == nil {
			log.Info("rebuilt rollups", "window", g, "month", m.Format("2006-01"), "accounts", len(accounts), "meters", len(meters))
		} else {
			log.Debug("rebuilt rollups", "window", g, "month", m.Format("2006-01"), "accounts", len(accounts), "meters", len(meters))
		}
	}
	return nil
}

// rebuildAccounts bounds the accounts one rebuild statement names: 2,000
// ids of up to 64 bytes quoted stay under ClickHouse's default
// max_query_size (256 KiB).
const rebuildAccounts = 2000

func monthStart(t time.Time) time.Time {
	t = t.UTC()
	return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
}

// runAll runs f over jobs, at most n at a time, and joins the errors.
func runAll[J any](ctx context.Context, jobs []J, n int, f func(context.Context, J) error) error {
	sem := make(chan struct{}, n)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := f(ctx, j); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("rollups: %w", err)
	}
	return nil
}

func lessTouched(a, b Touched) bool {
	if a.Account != b.Account {
		return a.Account < b.Account
	}
	if a.Environment != b.Environment {
		return a.Environment < b.Environment
	}
	return a.Minute.Before(b.Minute)
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Coalescer lets every ingest worker's batches share rollup rounds, and
// runs rounds as a pipeline of one stage per granularity. Records handed to
// Landed while a round's minute stage runs go into the next round, which
// starts its minute stage as soon as the previous round moves on to hours:
// minute and hour windows are fresh without waiting for day and month
// (which stageGap spaces). A
// coarser stage that falls behind takes every round queued for it at once
// and recomputes their windows in one INSERT, so a slow level costs fewer
// queries and fewer parts instead of holding the finer ones back. Each stage
// handles rounds in order, so a window's level is always recomputed after
// the finer level of the same round. A caller returns only after every
// level of a round that includes its records has succeeded, so ingest
// commits nothing whose rollups are not written.
type Coalescer struct {
	r      *Roller
	rounds *ingest.Rounds
	stop   context.CancelFunc
	done   chan struct{}
}

// landedSettle is how long a rollup round waits after its first batch for
// others: the batches of one shared raw insert are handed to Landed a
// moment apart, and without it they make a round each.
const landedSettle = 5 * time.Millisecond

// maxQueuedRounds bounds the rounds waiting between two stages (and so
// how many one coarser INSERT serves).
const maxQueuedRounds = 64

// stageGap is the least time between two recomputes of a granularity.
// Every recompute is an INSERT, and on ClickHouse 18.16 an INSERT costs
// 10–20 ms of CPU (a new part's files) however few rows it writes
// (docs/ingest.md); the rounds that queue meanwhile share the next one.
// Day and month windows, which the dashboard and the invoicer read, wait
// half a second. Minute and hour windows, which the usage API's freshness
// rests on, never wait here: their rounds follow the raw inserts, which
// are spaced already (ingest.SharedSink).
func stageGap(g Granularity) time.Duration {
	if g == Day || g == Month {
		return 500 * time.Millisecond
	}
	return 0
}

type round struct {
	levels  [][]Recompute
	waiters []chan<- error
	err     error
}

var _ ingest.Rollups = (*Coalescer)(nil)

// NewCoalescer starts the pipeline over r; Close stops it.
func NewCoalescer(r *Roller) *Coalescer {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Coalescer{r: r, rounds: ingest.NewRounds(errors.New("rollups: coalescer closed"), landedSettle), stop: cancel, done: make(chan struct{})}
	// The first stage takes rounds from feed one at a time (feed gathers
	// everything pending into each); later stages queue rounds.
	stages := make([]chan *round, len(Granularities)+1)
	stages[0] = make(chan *round)
	for i := 1; i < len(stages); i++ {
		stages[i] = make(chan *round, maxQueuedRounds)
	}
	var wg sync.WaitGroup
	for i := range Granularities {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(stages[i+1])
			var last time.Time
			for rd := range stages[i] {
				if gap := stageGap(Granularities[i]); gap > 0 {
					select {
					case <-time.After(time.Until(last.Add(gap))):
					case <-ctx.Done():
					}
				}
				batch := []*round{rd}
			drain:
				for len(batch) < maxQueuedRounds {
					select {
					case more, ok := <-stages[i]:
						if !ok {
							break drain
						}
						batch = append(batch, more)
					default:
						break drain
					}
				}
				last = time.Now()
				var reqs []Recompute
				for _, b := range batch {
					if b.err == nil {
						reqs = mergeRecomputes(reqs, b.levels[i])
					}
				}
				if len(reqs) > 0 {
					if err := r.store.Recompute(ctx, reqs); err != nil {
						for _, b := range batch {
							if b.err == nil {
								b.err = err
							}
						}
					}
				}
				for _, b := range batch {
					stages[i+1] <- b
				}
			}
		}()
	}
	go func() {
		for rd := range stages[len(Granularities)] {
			for _, w := range rd.waiters {
				w <- rd.err
			}
		}
	}()
	go func() {
		defer c.rounds.Stop()
		defer close(c.done)
		defer wg.Wait()
		defer close(stages[0])
		c.feed(ctx, stages[0])
	}()
	return c
}

// mergeRecomputes adds more to reqs, folding requests for the same meter
// definition and zone into one (their touched minutes combined).
func mergeRecomputes(reqs, more []Recompute) []Recompute {
	for _, m := range more {
		i := slices.IndexFunc(reqs, func(r Recompute) bool {
			return r.Zone == m.Zone && r.Granularity == m.Granularity && reflect.DeepEqual(r.Meter, m.Meter)
		})
		if i < 0 {
			reqs = append(reqs, Recompute{Meter: m.Meter, Granularity: m.Granularity, Zone: m.Zone,
				Touched: slices.Clone(m.Touched)})
			continue
		}
		seen := make(map[Touched]struct{}, len(reqs[i].Touched))
		for _, t := range reqs[i].Touched {
			seen[t] = struct{}{}
		}
		for _, t := range m.Touched {
			if _, ok := seen[t]; !ok {
				seen[t] = struct{}{}
				reqs[i].Touched = append(reqs[i].Touched, t)
			}
		}
	}
	return reqs
}

// Landed waits for a round that includes records.
func (c *Coalescer) Landed(ctx context.Context, records []ingest.Record) error {
	return c.rounds.Join(ctx, records)
}

// feed starts a round with everything pending whenever the first stage is
// free.
func (c *Coalescer) feed(ctx context.Context, first chan<- *round) {
	for {
		recs, waiters, ok := c.rounds.Next(ctx)
		if !ok {
			return
		}
		levels, err := c.r.plan(ctx, recs)
		select {
		case first <- &round{levels: levels, waiters: waiters, err: err}:
		case <-ctx.Done():
			for _, w := range waiters {
				w <- ctx.Err()
			}
			return
		}
	}
}

// Close stops the pipeline; callers still waiting get an error and retry
// (or stop) as ingest does.
func (c *Coalescer) Close() error {
	c.stop()
	<-c.done
	return nil
}
