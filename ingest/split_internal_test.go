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
		events, _, _, _ := splitInto(into, msgs(c.n), now, DefaultMaxLateness, 1000)
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
		events, _, _, _ := splitInto(nil, msgs[:c.n], now, DefaultMaxLateness, c.batchSize)
		if len(events) != c.n || cap(events) != c.room {
			t.Errorf("%d messages, batch size %d: %d events with room for %d, want %d with room for %d",
				c.n, c.batchSize, len(events), cap(events), c.n, c.room)
		}
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
