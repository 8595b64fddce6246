package clickhouse_test

import (
	"context"
	"fmt"
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

// TestUsageOfManyAccountsKeepsOnlyThoseAskedFor covers the read without an
// IN filter (more accounts than a literal list is worth): accounts with
// events but not asked for must not appear, and every count stays exact.
func TestUsageOfManyAccountsKeepsOnlyThoseAskedFor(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	march := invoicer.Period{Start: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)}
	b, err := ch.Conn.PrepareBatch(ctx, `INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
		event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)`)
	testenv.Must(t, err, "prepare")
	// Account i has i+1 live api calls and one test-mode call.
	const accounts = 400
	for i := 0; i < accounts; i++ {
		for j := 0; j <= i+1; j++ {
			env := "live"
			if j == i+1 {
				env = "test"
			}
			at := march.Start.Add(time.Duration(i*1000+j) * time.Second)
			testenv.Must(t, b.Append(uuid.New(), uint8(1), fmt.Sprintf("acct_%d", i), env, "k", "api_call", at,
				uint64(at.UnixMicro()), int64(1), int32(0), int64(i*1000+j), time.Now().UTC()), "append")
		}
	}
	testenv.Must(t, b.Send(), "insert")
	u := invch.New(ch.Conn)
	for _, n := range []int{3, 300} { // below and above the IN-list limit
		var asked []string
		for i := 0; i < n; i++ {
			asked = append(asked, fmt.Sprintf("acct_%d", 2*i)) // even accounts only
		}
		asked = append(asked, "acct_without_events")
		got, err := u.Usage(ctx, asked, march, []meter.Meter{meter.Default()}, schemas.Live)
		testenv.Must(t, err, "usage")
		want := 0
		for i := 0; i < n && 2*i < accounts; i++ {
			want++
			a, ok := got[fmt.Sprintf("acct_%d", 2*i)]
			if !ok || a.Events != int64(2*i+1) || a.Quantities["api_calls"] != int64(2*i+1) {
				t.Fatalf("%d asked: acct_%d = %+v (present %v), want %d live calls", n, 2*i, a, ok, 2*i+1)
			}
		}
		if len(got) != want {
			t.Fatalf("%d asked: %d accounts returned, want %d (only the asked ones with events)", n, len(got), want)
		}
	}
}
