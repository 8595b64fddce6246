package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/aggregatortest"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
)

// backfillResult is what the late-batch measurement found.
type backfillResult struct {
	batch, rebuild time.Duration
}

// backfill measures what a batch of late events costs: o.backfillEvents
// events spread over the 40 days before now (a client backfilling
// server-reported usage, say) land on o.backfillBase events already in
// those 40 days, with the test suite's eight meters over three event types
// and accounts in three zones. The batch's time is its raw insert plus the
// recompute of every window it touches, the best of o.repeat batches. The
// reference in the same run is the alternative an operator has: rebuilding
// those accounts' rollups for the whole 40 days from the raw events.
func backfill(ctx context.Context, o opts, ch driver.Conn, log *slog.Logger) (backfillResult, error) {
	meters := aggregatortest.Meters()
	zones := aggregatortest.Zones()
	sink := chsink.NewSink(ch)
	store := aggch.NewStore(ch)
	now := time.Now().UTC()
	// Its own tables: the freshness run's events would otherwise be
	// rebuilt too (RebuildAll takes every account with events in range),
	// nearly doubling what the reference reads.
	for _, t := range []string{"usage_events", "usage_rollups", "late_events"} {
		if err := ch.Exec(ctx, "TRUNCATE TABLE "+t); err != nil {
			return backfillResult{}, fmt.Errorf("backfill: truncate %s: %w", t, err)
		}
	}
	base := aggregatortest.GenEvents(rand.New(rand.NewPCG(1, 2)), o.backfillBase, now)
	for i := 0; i < len(base); i += 20_000 {
		if err := sink.Insert(ctx, aggregatortest.Records(base[i:min(i+20_000, len(base))])); err != nil {
			return backfillResult{}, fmt.Errorf("backfill: insert the events already there: %w", err)
		}
	}
	var res backfillResult
	// The rebuild, first: it also leaves the rollups the late batches
	// then update. Its range is the events' 40 days with a month of margin
	// on each side, as the rebuild command takes by default.
	// The best of o.repeat rebuilds, as the late batch is the best of
	// o.repeat: timed once, cold, it was held against warm batches. Each
	// rebuild rewrites the same rollups from the same events.
	for rep := 1; rep <= o.repeat; rep++ {
		t0 := time.Now()
		if err := aggregator.RebuildAll(ctx, store, zones, meters, now.AddDate(0, 0, -72), now.AddDate(0, 1, 0), log); err != nil {
			return res, fmt.Errorf("backfill: rebuild: %w", err)
		}
		d := time.Since(t0)
		fmt.Printf("backfill: rebuild %d: %d events' rollups (%d meters, 40 days, 3 zones) in %.2fs\n",
			rep, len(base), len(meters), d.Seconds())
		if res.rebuild == 0 || d < res.rebuild {
			res.rebuild = d
		}
	}
	timed := &levelTimes{RollupStore: store}
	roller := aggregator.NewRoller(aggregator.StaticMeters(meters), zones, timed, log)
	for rep := 1; rep <= o.repeat; rep++ {
		late := aggregatortest.Records(aggregatortest.GenEvents(rand.New(rand.NewPCG(uint64(rep), 3)), o.backfillEvents, now))
		timed.spent = map[aggregator.Granularity]time.Duration{}
		t0 := time.Now()
		if err := sink.Insert(ctx, late); err != nil {
			return res, fmt.Errorf("backfill: insert the late batch: %w", err)
		}
		if err := roller.Landed(ctx, late); err != nil {
			return res, fmt.Errorf("backfill: recompute the late batch's windows: %w", err)
		}
		d := time.Since(t0)
		fmt.Printf("  late batch %d: %d events over 40 days landed with their rollups in %.2fs (recompute: minute %.2fs, hour %.2fs, day %.2fs, month %.2fs)\n",
			rep, len(late), d.Seconds(), timed.spent[aggregator.Minute].Seconds(), timed.spent[aggregator.Hour].Seconds(),
			timed.spent[aggregator.Day].Seconds(), timed.spent[aggregator.Month].Seconds())
		if res.batch == 0 || d < res.batch {
			res.batch = d
		}
	}
	// The late batches must have landed exactly: every meter's day
	// rollups equal a plain computation over the same raw events.
	var rollup, raw uint64
	if err := ch.QueryRow(ctx, `SELECT toUInt64(sum(value)) FROM usage_rollups FINAL
        WHERE meter = 'api_calls' AND granularity = 'day' AND empty(group_values) AND account_id IN ('acct_utc', 'acct_tokyo', 'acct_kolkata')`).Scan(&rollup); err != nil {
		return res, fmt.Errorf("backfill: check: %w", err)
	}
	if err := ch.QueryRow(ctx, `SELECT count() FROM usage_events FINAL
        WHERE event_type = 'api_call' AND account_id IN ('acct_utc', 'acct_tokyo', 'acct_kolkata')`).Scan(&raw); err != nil {
		return res, fmt.Errorf("backfill: check: %w", err)
	}
	if rollup != raw {
		return res, fmt.Errorf("backfill: day rollups count %d api calls, the raw events %d", rollup, raw)
	}
	return res, nil
}

// levelTimes adds up the time each granularity's recomputes take.
type levelTimes struct {
	aggregator.RollupStore
	spent map[aggregator.Granularity]time.Duration
}

func (l *levelTimes) Recompute(ctx context.Context, rs []aggregator.Recompute) error {
	t0 := time.Now()
	err := l.RollupStore.Recompute(ctx, rs)
	if len(rs) > 0 {
		l.spent[rs[0].Granularity] += time.Since(t0)
	}
	return err
}
