package ingest

import (
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// A batch decodes into a landed batch's memory only when it fills at least
// half of it: a trickle of small batches each holding a full batch's
// memory while it lands would pass the records bound many times over.
func TestSplitReusesMemoryOnlyForABatchThatFillsHalfOfIt(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	msgs := func(n int) []Message { return encodedMessages(t, now, n) }
	into := make([]Record, 0, 100)
	for _, c := range []struct {
		n     int
		reuse bool
	}{{10, false}, {49, false}, {50, true}, {100, true}, {101, false}} {
		events, _, _, _ := splitInto(into, nil, msgs(c.n), now, DefaultMaxLateness, 1000)
		if len(events) != c.n {
			t.Fatalf("%d messages: %d events", c.n, len(events))
		}
		if reused := &events[0] == &into[:1][0]; reused != c.reuse {
			t.Errorf("%d messages into room for 100: reused %v, want %v", c.n, reused, c.reuse)
		}
	}
}

// A new buffer has a quarter more room than its batch, up to the batch
// size, so a free buffer fits the next batches of about its size.
func TestANewBufferHasRoomForALargerBatch(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	msgs := encodedMessages(t, now, 80)
	for _, c := range []struct{ n, batchSize, room int }{{80, 1000, 100}, {80, 90, 90}, {80, 80, 80}, {80, 0, 80}} {
		events, _, _, _ := splitInto(nil, nil, msgs[:c.n], now, DefaultMaxLateness, c.batchSize)
		if len(events) != c.n || cap(events) != c.room {
			t.Errorf("%d messages, batch size %d: %d events with room for %d, want %d with room for %d",
				c.n, c.batchSize, len(events), cap(events), c.n, c.room)
		}
	}
}

// A worker's one map for finding copies within a batch is left empty by
// each batch: a copy in the next batch is ClickHouse's to find (the raw
// table's key), and one remembered from the batch before would be dropped
// here as a duplicate of an event the batch does not hold.
func TestSplitLeavesTheSharedMapEmpty(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	msgs := encodedMessages(t, now, 50)
	seen := make(map[idSecond]string)
	for round := range 2 {
		events, _, _, dups := splitInto(nil, seen, msgs, now, DefaultMaxLateness, 1000)
		if len(events) != 50 || dups != 0 {
			t.Fatalf("round %d: %d events and %d duplicates, want 50 and 0", round+1, len(events), dups)
		}
		if len(seen) != 0 {
			t.Fatalf("round %d: the map holds %d entries after the batch", round+1, len(seen))
		}
	}
	// Within one batch the map still finds the copies.
	events, _, _, dups := splitInto(nil, seen, append(msgs[:10:10], msgs[:10]...), now, DefaultMaxLateness, 1000)
	if len(events) != 10 || dups != 10 {
		t.Fatalf("a batch of 10 events twice: %d events and %d duplicates, want 10 and 10", len(events), dups)
	}
}

// A worker keeps every landed batch's buffer it may take again, up to
// room for MaxInFlightRecords records between them: batches land together,
// and a queue of two let the rest go.
func TestLandedBuffersAreKeptUpToTheRecordsBound(t *testing.T) {
	free := &recordBuffers{limit: 100}
	for range 4 {
		free.put(make([]Record, 3, 30)) // room for 120 in all: the fourth is let go
	}
	if free.records != 90 || len(free.bufs) != 3 {
		t.Fatalf("kept %d buffers with room for %d records, want 3 with room for 90", len(free.bufs), free.records)
	}
	for i := range 3 {
		b := free.get()
		if b == nil || len(b) != 0 || cap(b) != 30 {
			t.Fatalf("get %d: %d records with room for %d, want an empty buffer with room for 30", i+1, len(b), cap(b))
		}
	}
	// A kept buffer holds nothing of its last batch.
	used := make([]Record, 1, 10)
	used[0].Value, used[0].Event.AccountID = []byte("message"), "acct"
	free.put(used)
	if b := free.get(); b[:1][0].Value != nil || b[:1][0].Event.AccountID != "" {
		t.Fatalf("a kept buffer still holds its last batch's record: %+v", b[:1][0])
	}
	if b := free.get(); b != nil || free.records != 0 {
		t.Fatalf("after every buffer was taken: got room for %d, %d records counted as kept", cap(b), free.records)
	}
}

// encodedMessages is n records of distinct valid events a second before now.
func encodedMessages(t *testing.T, now time.Time, n int) []Message {
	t.Helper()
	out := make([]Message, n)
	for i := range out {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "a", Environment: schemas.Live,
			KeyID: "k", Type: "api_call", Time: now.Add(-time.Second), Units: 1}
		v, err := e.Encode()
		if err != nil {
			t.Fatal(err)
		}
		out[i] = Message{Offset: int64(i), Value: v, Time: now}
	}
	return out
}
