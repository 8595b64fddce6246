package clickhouse_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/aggregatortest"
	"github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

var (
	testMeters = aggregatortest.Meters()
	zones      = aggregatortest.Zones()
)

// TestRollupsEqualAnIndependentComputation lands events in batches (one of
// them twice, as a redelivery would), lets the Roller recompute the windows
// they touch, and compares every rollup row of every meter and granularity
// with a plain-Go computation over the distinct events. Then it rebuilds
// everything from the raw events and compares again.
func TestRollupsEqualAnIndependentComputation(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	events := aggregatortest.GenEvents(rng, 3000, time.Now().UTC())
	sink := chsink.NewSink(ch.Conn)
	store := clickhouse.NewStore(ch.Conn)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	roller := aggregator.NewRoller(aggregator.StaticMeters(testMeters), zones, store, log)
	for i := 0; i < len(events); i += 500 {
		batch := aggregatortest.Records(events[i:min(i+500, len(events))])
		for range 1 + i/2500 { // the last batch lands twice
			testenv.Must(t, sink.Insert(ctx, batch), "insert raw")
			testenv.Must(t, roller.Landed(ctx, batch), "recompute rollups")
		}
	}
	compareAll(t, store, events)

	testenv.Must(t, ch.Conn.Exec(ctx, "TRUNCATE TABLE usage_rollups"), "truncate rollups")
	testenv.Must(t, aggregator.RebuildAll(ctx, store, zones, testMeters, time.Time{}, time.Time{}, log), "rebuild")
	compareAll(t, store, events)
}

// TestABatchTouchingManyMinutesIsRecomputedInPieces lands one batch whose
// events fall in 2,500 different minutes over 40 days, as a burst of late
// events (a client backfilling a day of server-reported usage, say) can.
// With four meters on the event type, listing every touched minute in one
// INSERT came to more than ClickHouse's 256 KiB max_query_size, and the
// recompute failed on every retry ("Max query size exceeded"), stalling
// the partition. The touched windows are now split over as many SELECTs and
// INSERTs as the limit needs, and each window is still recomputed whole.
func TestABatchTouchingManyMinutesIsRecomputedInPieces(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(3, 4)), 2500, time.Now().UTC())
	store := clickhouse.NewStore(ch.Conn)
	roller := aggregator.NewRoller(aggregator.StaticMeters(testMeters), zones, store, slog.New(slog.NewTextHandler(io.Discard, nil)))
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	testenv.Must(t, roller.Landed(ctx, batch), "recompute rollups")
	compareAll(t, store, events)
}

func compareAll(t *testing.T, store *clickhouse.Store, events []schemas.Event) {
	t.Helper()
	compareAllIn(t, store, events, zones)
}

// compareAllIn compares every rollup row with a plain-Go computation, the
// accounts in zs's zones.
func compareAllIn(t *testing.T, store *clickhouse.Store, events []schemas.Event, zs aggregator.StaticZones) {
	t.Helper()
	locs, err := aggregatortest.Locations(zs)
	testenv.Must(t, err, "load zones")
	for _, m := range testMeters {
		for _, g := range aggregator.Granularities {
			want := aggregatortest.Expected(events, m, g, locs)
			got := map[aggregatortest.Key]int64{}
			for _, acct := range aggregatortest.Accounts {
				for _, env := range []schemas.Environment{schemas.Live, schemas.Test} {
					for _, grouped := range []bool{false, true} {
						rows, err := store.Usage(context.Background(), aggregator.UsageQuery{Account: acct, Environment: string(env),
							Meter: m.Key, Granularity: g, From: time.Unix(0, 0), To: time.Now().Add(time.Hour),
							Grouped: grouped, Limit: 1 << 30})
						testenv.Must(t, err, "read usage")
						for _, r := range rows {
							got[aggregatortest.Key{Account: acct, Environment: env, Granularity: g, WindowStart: r.WindowStart.UTC(),
								Group: strings.Join(r.Group, "\x00"), Total: !grouped}] = r.Value
						}
					}
				}
			}
			for _, d := range aggregatortest.Diff(want, got, 3) {
				t.Errorf("meter %s by %s: %s", m.Key, g, d)
			}
		}
	}
}

// TestRollupsWhereGoAndClickHouseDisagreeOnAZone lands events in the day
// after Lord Howe Island's April 2026 clock change, when ClickHouse 18.16
// starts that zone's hours 30 minutes away from where Go's zone rules do.
// The rollups must still equal ClickHouse's own aggregation of the raw
// events by the same window expressions: recomputes scan a margin around
// the window Go computes, wide enough for ClickHouse's window to be read
// whole.
func TestRollupsWhereGoAndClickHouseDisagreeOnAZone(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	const acct, tz = "acct_lord_howe", "Australia/Lord_Howe"
	lhZones := aggregator.StaticZones{acct: tz}
	rng := rand.New(rand.NewPCG(3, 4))
	from := time.Date(2026, 4, 4, 14, 0, 0, 0, time.UTC)
	var events []schemas.Event
	for at := from; at.Before(from.Add(36 * time.Hour)); at = at.Add(time.Duration(1+rng.IntN(300)) * time.Second) {
		events = append(events, schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: schemas.Live,
			KeyID: "key_1", Type: "api_call", Units: 1, Time: at.Truncate(time.Microsecond)})
	}
	sink := chsink.NewSink(ch.Conn)
	store := clickhouse.NewStore(ch.Conn)
	roller := aggregator.NewRoller(aggregator.StaticMeters([]meter.Meter{meter.Default()}), lhZones, store, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := 0; i < len(events); i += 37 {
		batch := aggregatortest.Records(events[i:min(i+37, len(events))])
		testenv.Must(t, sink.Insert(ctx, batch), "insert raw")
		testenv.Must(t, roller.Landed(ctx, batch), "recompute rollups")
	}
	for _, c := range []struct {
		g    aggregator.Granularity
		expr string
	}{
		{aggregator.Hour, "toStartOfHour(timestamp, '" + tz + "')"},
		{aggregator.Day, "toStartOfDay(timestamp, '" + tz + "')"},
		{aggregator.Month, "toDateTime(toStartOfMonth(toTimeZone(timestamp, '" + tz + "')), '" + tz + "')"},
	} {
		want := map[int64]int64{}
		rows, err := ch.Conn.Query(ctx, "SELECT toUInt32("+c.expr+") AS w, count() FROM usage_events FINAL WHERE account_id = ? GROUP BY w", acct)
		testenv.Must(t, err, "aggregate raw events")
		for rows.Next() {
			var w uint32
			var n uint64
			testenv.Must(t, rows.Scan(&w, &n), "scan")
			want[int64(w)] = int64(n)
		}
		testenv.Must(t, rows.Err(), "rows")
		rows.Close()
		usage, err := store.Usage(ctx, aggregator.UsageQuery{Account: acct, Environment: string(schemas.Live), Meter: meter.Default().Key,
			Granularity: c.g, From: from.AddDate(0, -1, 0), To: from.AddDate(0, 1, 0), Limit: 1 << 20})
		testenv.Must(t, err, "read usage")
		got := map[int64]int64{}
		for _, r := range usage {
			got[r.WindowStart.Unix()] = r.Value
		}
		for w, n := range want {
			if got[w] != n {
				t.Errorf("%s window %s: rollup %d, raw events %d", c.g, time.Unix(w, 0).UTC().Format(time.RFC3339), got[w], n)
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s: %d rollup windows, %d windows of raw events", c.g, len(got), len(want))
		}
	}
}

// TestRebuildOfManyAccounts rebuilds the rollups of 5,000 accounts with
// long ids: named in one statement they came to more than ClickHouse's
// 256 KiB max_query_size, and the rebuild failed. RebuildAll now names at
// most 2,000 accounts a statement.
func TestRebuildOfManyAccounts(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	at := time.Now().UTC().Add(-time.Hour).Truncate(time.Minute)
	events := make([]schemas.Event, 5000)
	for i := range events {
		events[i] = schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(),
			AccountID: fmt.Sprintf("acct_%059d", i), Environment: schemas.Live, KeyID: "key_many", Type: "api_call",
			Time: at.Add(time.Duration(i) * time.Millisecond), Units: 1}
		events[i].Normalize()
	}
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, aggregatortest.Records(events)), "insert raw")
	store := clickhouse.NewStore(ch.Conn)
	calls := []meter.Meter{{Key: "calls", EventType: "api_call", Aggregation: meter.Count}}
	testenv.Must(t, aggregator.RebuildAll(ctx, store, aggregator.StaticZones{}, calls, at.Add(-time.Hour), at.Add(time.Hour),
		slog.New(slog.DiscardHandler)), "rebuild")
	var rows, sum uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, `SELECT count(), sum(events) FROM usage_rollups FINAL
		WHERE meter = 'calls' AND granularity = 'hour' AND empty(group_values)`).Scan(&rows, &sum), "count hour rows")
	if rows != 5000 || sum != 5000 {
		t.Fatalf("%d hour rows counting %d events, want one row per account counting 5,000", rows, sum)
	}
}

// TestReplaceAllAfterAZoneChange moves every account to UTC after its
// rollups were computed in its own zone. A rebuild alone leaves the old
// zone's day and month rows where they were (their window starts differ, so
// no new row replaces them); ReplaceAll deletes them first, and every row
// then equals a plain-Go computation in UTC.
func TestReplaceAllAfterAZoneChange(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(5, 6)), 1500, time.Now().UTC())
	store := clickhouse.NewStore(ch.Conn)
	log := slog.New(slog.DiscardHandler)
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(testMeters), zones, store, log).Landed(ctx, batch), "recompute rollups")
	utc := aggregator.StaticZones{}
	testenv.Must(t, aggregator.ReplaceAll(ctx, store, utc, testMeters, time.Time{}, time.Time{}, log), "replace rollups")
	compareAllIn(t, store, events, utc)
}

// A meter whose key has no rows is deleted without a mutation: the backfill
// of every new meter deletes first, and a mutation rewrites parts of the
// whole table. A key with rows still has them deleted.
func TestDeleteRollupsMutatesOnlyWhenRowsMatch(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	store := clickhouse.NewStore(ch.Conn)
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(7, 8)), 200, time.Now().UTC())
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(testMeters), zones, store, slog.New(slog.DiscardHandler)).Landed(ctx, batch), "recompute rollups")
	from, to := time.Now().Add(-400*24*time.Hour), time.Now().Add(400*24*time.Hour)
	count := func(q string) uint64 {
		t.Helper()
		var n uint64
		testenv.Must(t, ch.Conn.QueryRow(ctx, q).Scan(&n), q)
		return n
	}
	mutations := "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = 'usage_rollups'"

	testenv.Must(t, store.DeleteRollups(ctx, []string{"no_such_meter"}, from, to), "delete a key without rows")
	if n := count(mutations); n != 0 {
		t.Errorf("%d mutation(s) after deleting a key without rows, want none", n)
	}
	key := testMeters[0].Key
	testenv.Must(t, store.DeleteRollups(ctx, []string{key}, from, to), "delete a key with rows")
	if n := count(mutations); n != 1 {
		t.Errorf("%d mutation(s) after deleting a key with rows, want 1", n)
	}
	if n := count(fmt.Sprintf("SELECT count() FROM usage_rollups WHERE meter = '%s'", key)); n != 0 {
		t.Errorf("%d row(s) of %s left after deleting them", n, key)
	}
}

// TestManyMetersWithLongFiltersAreRecomputedInPieces: forty meters on one
// event type, each with as many filter values as the bound allows. One
// shared scan carries every meter's values and cannot be split, and with
// all forty it came to more than ClickHouse's max_query_size, which failed
// every round (and every rebuild) for every account. Scans now take the
// meters in groups whose values fit, and the rollups are exact.
// Each meter's group-by properties are written into its scan too: two
// hundred meters of one event type, each grouping by as many long dimension
// names as a meter may, made one SELECT larger than ClickHouse takes
// before the scans counted them.
func TestManyMetersWithWideGroupByAreRecomputedInPieces(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	var ms []meter.Meter
	for i := range 200 {
		m := meter.Meter{Key: fmt.Sprintf("wide_calls_%03d", i), EventType: "api_call", Aggregation: meter.Count}
		for d := range meter.MaxGroupBy {
			m.GroupBy = append(m.GroupBy, fmt.Sprintf("dimensions.d%02d_%s", d, strings.Repeat("x", 60)))
		}
		testenv.Must(t, m.Validate(), "a meter at the bound")
		ms = append(ms, m)
	}
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(7, 8)), 200, time.Now().UTC())
	store := clickhouse.NewStore(ch.Conn)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(ms), zones, store, log).Landed(ctx, batch), "recompute rollups")
	locs, err := aggregatortest.Locations(zones)
	testenv.Must(t, err, "load zones")
	for _, m := range []meter.Meter{ms[0], ms[len(ms)-1]} {
		want := aggregatortest.Expected(events, m, aggregator.Day, locs)
		var wantTotal, gotTotal int64
		for k, v := range want {
			if k.Total {
				wantTotal += v
			}
		}
		for _, acct := range aggregatortest.Accounts {
			for _, env := range []schemas.Environment{schemas.Live, schemas.Test} {
				rows, err := store.Usage(ctx, aggregator.UsageQuery{Account: acct, Environment: string(env), Meter: m.Key,
					Granularity: aggregator.Day, From: time.Unix(0, 0), To: time.Now().Add(time.Hour), Limit: 1 << 30})
				testenv.Must(t, err, "read usage")
				for _, r := range rows {
					gotTotal += r.Value
				}
			}
		}
		if gotTotal != wantTotal || wantTotal == 0 {
			t.Errorf("meter %s: %d calls in its day rollups, want %d", m.Key, gotTotal, wantTotal)
		}
	}
}

func TestManyMetersWithLongFiltersAreRecomputedInPieces(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	values := []string{"/v1/a", "/v1/c"}
	for i := 0; meter.FilterValueBytes(values)+len("/v1/zz/00000")+4 <= meter.MaxFilterBytes; i++ {
		values = append(values, fmt.Sprintf("/v1/zz/%05d", i))
	}
	var ms []meter.Meter
	for i := range 40 {
		m := meter.Meter{Key: fmt.Sprintf("listed_calls_%02d", i), EventType: "api_call", Aggregation: meter.Count,
			Filters: []meter.Filter{{Property: "route", Values: values}}}
		testenv.Must(t, m.Validate(), "a meter at the bound")
		ms = append(ms, m)
	}
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(5, 6)), 300, time.Now().UTC())
	store := clickhouse.NewStore(ch.Conn)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(ms), zones, store, log).Landed(ctx, batch), "recompute rollups")
	check := func(when string) {
		locs, err := aggregatortest.Locations(zones)
		testenv.Must(t, err, "load zones")
		for _, m := range []meter.Meter{ms[0], ms[len(ms)-1]} {
			for _, g := range aggregator.Granularities {
				want := aggregatortest.Expected(events, m, g, locs)
				got := map[aggregatortest.Key]int64{}
				for _, acct := range aggregatortest.Accounts {
					for _, env := range []schemas.Environment{schemas.Live, schemas.Test} {
						rows, err := store.Usage(ctx, aggregator.UsageQuery{Account: acct, Environment: string(env), Meter: m.Key,
							Granularity: g, From: time.Unix(0, 0), To: time.Now().Add(time.Hour), Limit: 1 << 30})
						testenv.Must(t, err, "read usage")
						for _, r := range rows {
							got[aggregatortest.Key{Account: acct, Environment: env, Granularity: g, WindowStart: r.WindowStart.UTC(), Total: true}] = r.Value
						}
					}
				}
				for k := range want {
					if !k.Total {
						delete(want, k)
					}
				}
				for _, d := range aggregatortest.Diff(want, got, 3) {
					t.Errorf("%s: meter %s by %s: %s", when, m.Key, g, d)
				}
			}
		}
	}
	check("recomputed")
	testenv.Must(t, ch.Conn.Exec(ctx, "TRUNCATE TABLE usage_rollups"), "truncate rollups")
	testenv.Must(t, aggregator.RebuildAll(ctx, store, zones, ms, time.Time{}, time.Time{}, log), "rebuild")
	check("rebuilt")
}
