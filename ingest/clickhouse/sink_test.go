package clickhouse

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestInsertSendsBlocksAsOnePart: an insert of more rows than one block
// reaches the table whole, every field of every row in place, and as one
// part, so sending it in blocks costs the table nothing.
func TestInsertSendsBlocksAsOnePart(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	testenv.Must(t, ch.Conn.Exec(ctx, "SYSTEM STOP MERGES usage_events"), "stop merges")
	n := 2*blockRows + 123
	base := time.Now().UTC().Truncate(time.Second)
	recs := make([]ingest.Record, n)
	for i := range recs {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: fmt.Sprintf("acct_%d", i%7),
			Environment: schemas.Live, KeyID: "key_blocks", Type: "api_call", Time: base.Add(time.Duration(i) * time.Millisecond),
			Route: "/v1/blocks", Method: "GET", Status: 200, LatencyMicros: int64(i), Units: int64(i%5 + 1),
			RequestID: fmt.Sprintf("req_%d", i), Dimensions: map[string]string{"n": fmt.Sprint(i)}}
		e.Normalize()
		recs[i] = ingest.Record{Event: e, Partition: i % 3, Offset: int64(i)}
	}
	// The records come in three groups, as the shared insert passes them.
	testenv.Must(t, NewSink(ch.Conn).Insert(ctx, recs[:1000], recs[1000:5000], recs[5000:]), "insert")

	var rows, parts, badRows uint64
	var units int64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count(), sum(units) FROM usage_events").Scan(&rows, &units), "count")
	testenv.Must(t, ch.Conn.QueryRow(ctx, `SELECT count() FROM usage_events
		WHERE latency_us != kafka_offset OR request_id != concat('req_', toString(kafka_offset))
		   OR dim_values[1] != toString(kafka_offset) OR kafka_partition != kafka_offset % 3
		   OR account_id != concat('acct_', toString(kafka_offset % 7))`).Scan(&badRows), "check rows")
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'usage_events' AND active").Scan(&parts), "parts")
	var wantUnits int64
	for _, r := range recs {
		wantUnits += r.Event.Units
	}
	if rows != uint64(n) || units != wantUnits {
		t.Fatalf("%d rows, %d units in the table; want %d rows, %d units", rows, units, n, wantUnits)
	}
	if badRows != 0 {
		t.Fatalf("%d rows have a field out of place", badRows)
	}
	if parts != 1 {
		t.Fatalf("the insert made %d parts, want 1", parts)
	}
}
