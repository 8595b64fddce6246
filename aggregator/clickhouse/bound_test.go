package clickhouse_test

import (
	"context"
	"log/slog"
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
	ctx := context.Background()
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
	batch := aggregatortest.Records(events)
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, batch), "insert raw")
	store := clickhouse.NewStore(ch.Conn)
	testenv.Must(t, aggregator.NewRoller(aggregator.StaticMeters(meters), aggregator.StaticZones{}, store, slog.New(slog.DiscardHandler)).
		Landed(ctx, batch), "recompute rollups")
	for _, m := range meters {
		for _, g := range aggregator.Granularities {
			rows, err := store.Usage(ctx, aggregator.UsageQuery{Account: "acct_big", Environment: string(schemas.Live), Meter: m.Key,
				Granularity: g, From: at.AddDate(0, -1, 0), To: at.AddDate(0, 1, 0), Limit: 100})
			testenv.Must(t, err, "read usage")
			var got []int64
			for _, r := range rows {
				got = append(got, r.Value)
			}
			if len(got) != 1 || got[0] != want[m.Key] {
				t.Errorf("%s by %s: %v, want one window of %d", m.Key, g, got, want[m.Key])
			}
		}
	}
}
