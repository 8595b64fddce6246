package clickhouse_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestUsageIsExactWhetherOrNotPartsAreMerged reads the same events while
// duplicates sit in separate parts (FINAL path), after the partition is
// merged into one part (plain read), and after a redelivered duplicate
// lands in the merged partition again (back to FINAL).
func TestUsageIsExactWhetherOrNotPartsAreMerged(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	march := invoicer.Period{Start: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)}
	ids := make([]uuid.UUID, 300)
	for i := range ids {
		ids[i] = uuid.New()
	}
	insert := func(from, to int, typ string) {
		b, err := ch.Conn.PrepareBatch(ctx, `INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
			event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)`)
		testenv.Must(t, err, "prepare")
		for i := from; i < to; i++ {
			at := march.Start.Add(time.Duration(i) * time.Minute)
			testenv.Must(t, b.Append(ids[i], uint8(1), "acct_1", "live", "k", typ, at, uint64(at.UnixMicro()), int64(i),
				int32(0), int64(i), time.Now().UTC()), "append")
		}
		testenv.Must(t, b.Send(), "insert")
	}
	insert(0, 200, "api_call")
	insert(100, 250, "api_call") // 100 redelivered duplicates in a second part
	insert(250, 300, "other")
	u := invch.New(ch.Conn)
	meters := []meter.Meter{meter.Default(), {Key: "units", EventType: "api_call", Aggregation: meter.Sum, Value: "units"}}
	check := func(name string) {
		t.Helper()
		got, err := u.Usage(ctx, []string{"acct_1", "acct_none"}, march, meters, schemas.Live)
		testenv.Must(t, err, "usage")
		a := got["acct_1"]
		// 250 distinct api calls with units 0..249, plus 50 other events.
		if a.Events != 300 || a.Quantities["api_calls"] != 250 || a.Quantities["units"] != 249*250/2 || len(got) != 1 {
			t.Fatalf("%s: %+v", name, got)
		}
	}
	check("duplicates in separate parts")
	testenv.Must(t, ch.Conn.Exec(ctx, "OPTIMIZE TABLE usage_events FINAL"), "optimize")
	check("one merged part")
	insert(0, 10, "api_call") // redelivered after the merge
	check("a duplicate after the merge")
}
