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

// TestALateCopyOfACountedEventIsNotALateEvent: a too-late copy of an event
// usage_events already counts (same id, type and second) is left out of
// late_events; a copy differing in any of those, and a new event, are
// late events, across accounts, more ids than one lookup names and event
// times further apart than one lookup spans.
func TestALateCopyOfACountedEventIsNotALateEvent(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	old := time.Now().UTC().Add(-40 * 24 * time.Hour).Truncate(time.Second)
	ev := func(account string, at time.Time) ingest.Record {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: account, Environment: schemas.Live,
			KeyID: "key_late", Type: "api_call", Time: at, Units: 1}
		e.Normalize()
		return ingest.Record{Event: e, RecordTime: time.Now(), Value: []byte("{}")}
	}
	// Counted: more than one lookup's worth for one account, and one
	// event of another account.
	var counted []ingest.Record
	for i := range countedChunk + 5 {
		counted = append(counted, ev("acct_late_a", old.Add(time.Duration(i)*time.Second+250*time.Millisecond)))
	}
	counted = append(counted, ev("acct_late_b", old), ev("acct_late_a", old.Add(-3*24*time.Hour)),
		ev("acct_late_a", old.Add(-30*24*time.Hour)))
	sink := NewSink(ch.Conn)
	testenv.Must(t, sink.Insert(ctx, counted), "insert counted")

	var late []ingest.Record
	for _, r := range counted {
		c := r
		c.Event.Time = c.Event.Time.Add(500 * time.Millisecond) // the same second
		late = append(late, c)
	}
	otherType, otherSecond, otherEnv, otherAccount, fresh := counted[3], counted[4], counted[5], counted[6], ev("acct_late_a", old)
	otherType.Event.Type = "report"
	otherSecond.Event.Time = otherSecond.Event.Time.Add(time.Second)
	otherEnv.Event.Environment = schemas.Test
	otherAccount.Event.AccountID = "acct_late_b"
	newOnes := []ingest.Record{otherType, otherSecond, otherEnv, otherAccount, fresh}
	late = append(late, newOnes...)

	kept, err := sink.InsertLate(ctx, late)
	testenv.Must(t, err, "insert late")
	if len(kept) != len(newOnes) {
		t.Fatalf("%d late events written, want the %d that no counted row matches", len(kept), len(newOnes))
	}
	for i, r := range kept {
		if rowOf(r) != rowOf(newOnes[i]) {
			t.Errorf("written %d: %+v, want %+v", i, rowOf(r), rowOf(newOnes[i]))
		}
	}
	var n uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM late_events FINAL").Scan(&n), "count late")
	if n != uint64(len(newOnes)) {
		t.Fatalf("late_events holds %d, want %d", n, len(newOnes))
	}
}

// TestTooLateEventsOfOneIdAndAnotherTypeOrSecondStayApart: late_events is
// keyed as usage_events is, so three too-late events sharing one id, but
// not a type or a second, are three, as three counted rows would be (keyed
// by id alone, they read as one under FINAL).
func TestTooLateEventsOfOneIdAndAnotherTypeOrSecondStayApart(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	at := time.Now().UTC().Add(-40 * 24 * time.Hour).Truncate(time.Second)
	e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_late_key", Environment: schemas.Live,
		KeyID: "key_late", Type: "api_call", Time: at, Units: 1}
	e.Normalize()
	r := ingest.Record{Event: e, RecordTime: time.Now(), Value: []byte("{}")}
	otherType, otherSecond := r, r
	otherType.Event.Type = "report"
	otherSecond.Event.Time = at.Add(time.Second)
	kept, err := NewSink(ch.Conn).InsertLate(ctx, []ingest.Record{r, otherType, otherSecond})
	testenv.Must(t, err, "insert late")
	var n uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM late_events FINAL").Scan(&n), "count late")
	if len(kept) != 3 || n != 3 {
		t.Fatalf("%d written, late_events holds %d under FINAL; want 3 and 3", len(kept), n)
	}
}
