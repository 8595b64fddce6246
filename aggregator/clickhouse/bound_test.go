package clickhouse_test

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"slices"
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

// TestDimensionValuesBeyondTheBoundAreNotCounted lands ten events whose
// amount is 999999999999999999 among ordinary ones. Their sum wrapped the
// Int64 rollups negative, at every granularity; now a value beyond
// meter.MaxValue is not counted by SUM or MAX, and MaxValue itself is.
func TestDimensionValuesBeyondTheBoundAreNotCounted(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	at := time.Now().UTC().Add(-time.Hour).Truncate(time.Minute)
	var events []schemas.Event
	add := func(amount string) {
		events = append(events, schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_big",
			Environment: schemas.Live, KeyID: "key_1", Type: "wallet", Time: at.Add(time.Duration(len(events)) * time.Second),
			Dimensions: map[string]string{"amount": amount}})
	}
	for range 10 {
		add("999999999999999999")
	}
	add("1000000000001")
	add("1000000000000")
	add("-1000000000000")
	add("5")
	meters := []meter.Meter{
		{Key: "total", EventType: "wallet", Aggregation: meter.Sum, Value: "dimensions.amount"},
		{Key: "peak", EventType: "wallet", Aggregation: meter.Max, Value: "dimensions.amount"},
	}
	want := map[string]int64{"total": 5, "peak": meter.MaxValue}
	store := landAndRollUp(t, ch, meters, events)
	for _, m := range meters {
		for _, g := range aggregator.Granularities {
			got := windowValues(t, store, "acct_big", m.Key, g, at)
			if len(got) != 1 || got[0] != want[m.Key] {
				t.Errorf("%s by %s: %v, want one window of %d", m.Key, g, got, want[m.Key])
			}
		}
	}
}

// TestASumPastInt64SaturatesAtEveryGranularity lands units that add up past
// Int64 (stored as such; new events are bounded, but enough of them add up
// all the same). ClickHouse's sum wrapped them modulo 2^64, to a value that
// could be negative or look like ordinary usage; every granularity now
// reads Int64's largest value, which meter.Overflowed marks, and a meter
// whose total fits is unchanged beside it.
func TestASumPastInt64SaturatesAtEveryGranularity(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	at := time.Now().UTC().Add(-time.Hour).Truncate(time.Hour)
	var events []schemas.Event
	for i := range 12 {
		typ, units := "tokens", int64(1e18)
		if i%4 == 3 {
			typ, units = "small", 7
		}
		// Two minutes: each minute's total (6 of 10^18) fits, the hour's
		// does not.
		events = append(events, schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_huge",
			Environment: schemas.Live, KeyID: "key_1", Type: typ, Time: at.Add(time.Duration(i/6)*time.Minute + time.Duration(i)*time.Second),
			Units: units})
	}
	for range 2 { // and one minute past Int64 on its own
		events = append(events, schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_huge",
			Environment: schemas.Live, KeyID: "key_1", Type: "tokens", Time: at.Add(5 * time.Minute), Units: 5e18})
	}
	// A minute past Int64 beside a negative one (a correction): the hour's
	// total is unknown, and stays marked, rather than read as 5.2 * 10^18.
	for i, u := range []int64{5e18, 5e18, -4e18} {
		events = append(events, schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_huge",
			Environment: schemas.Live, KeyID: "key_1", Type: "credits", Time: at.Add(time.Duration(i/2)*time.Minute + time.Duration(i)*time.Second),
			Units: u})
	}
	meters := []meter.Meter{
		{Key: "tokens", EventType: "tokens", Aggregation: meter.Sum, Value: "units"},
		{Key: "small", EventType: "small", Aggregation: meter.Sum, Value: "units"},
		{Key: "credits", EventType: "credits", Aggregation: meter.Sum, Value: "units"},
	}
	store := landAndRollUp(t, ch, meters, events)
	want := map[string]map[aggregator.Granularity][]int64{
		"tokens": {
			aggregator.Minute: {5e18, 4e18, math.MaxInt64},
			aggregator.Hour:   {math.MaxInt64}, aggregator.Day: {math.MaxInt64}, aggregator.Month: {math.MaxInt64},
		},
		"small": {aggregator.Minute: {7, 14}, aggregator.Hour: {21}, aggregator.Day: {21}, aggregator.Month: {21}},
		"credits": {
			aggregator.Minute: {math.MaxInt64, -4e18},
			aggregator.Hour:   {math.MaxInt64}, aggregator.Day: {math.MaxInt64}, aggregator.Month: {math.MaxInt64},
		},
	}
	for _, m := range meters {
		for _, g := range aggregator.Granularities {
			got := windowValues(t, store, "acct_huge", m.Key, g, at)
			if fmt.Sprint(got) != fmt.Sprint(want[m.Key][g]) {
				t.Errorf("%s by %s: %v, want %v", m.Key, g, got, want[m.Key][g])
			}
			// The plain-Go reference the exactness tests use agrees.
			var ref []int64
			for _, v := range aggregatortest.Expected(events, m, g, nil) {
				ref = append(ref, v)
			}
			slices.Sort(ref)
			wantSorted := slices.Sorted(slices.Values(want[m.Key][g]))
			if fmt.Sprint(ref) != fmt.Sprint(wantSorted) {
				t.Errorf("%s by %s: the reference computation gives %v, want %v", m.Key, g, ref, wantSorted)
			}
		}
	}
}

// landAndRollUp inserts events as raw rows and rolls them up for meters.
func landAndRollUp(t *testing.T, ch *testenv.ClickHouse, meters []meter.Meter, events []schemas.Event) *clickhouse.Store {
	t.Helper()
	ctx := context.Background()
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	store := clickhouse.NewStore(ch.Conn)
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(meters), aggregator.StaticZones{}, store, slog.New(slog.DiscardHandler)).
		Landed(ctx, batch), "recompute rollups")
	return store
}

// windowValues is the values of account's live rows of meter at g, from a
// month before at to a month after, in window order.
func windowValues(t *testing.T, store *clickhouse.Store, account, meter string, g aggregator.Granularity, at time.Time) []int64 {
	t.Helper()
	rows, err := store.Usage(context.Background(), aggregator.UsageQuery{Account: account, Environment: string(schemas.Live), Meter: meter,
		Granularity: g, From: at.AddDate(0, -1, 0), To: at.AddDate(0, 1, 0), Limit: 100})
	testenv.Must(t, err, "read usage")
	var got []int64
	for _, r := range rows {
		got = append(got, r.Value)
	}
	return got
}
