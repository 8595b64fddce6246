package ingest_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/schemas"
)

func encode(t *testing.T, e schemas.Event) []byte {
	t.Helper()
	b, err := e.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSplit(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	ev := func(at time.Time) schemas.Event {
		return schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "a", Environment: schemas.Live,
			KeyID: "k", Type: "api_call", Time: at, Units: 1}
	}
	timely, late, tooLate := ev(now.Add(-time.Second)), ev(now.Add(-30*24*time.Hour)), ev(now.Add(-36*24*time.Hour))
	shifted := func(e schemas.Event, d time.Duration) schemas.Event { e.Time = e.Time.Add(d); return e }
	retyped := func(e schemas.Event, typ string) schemas.Event { e.Type = typ; return e }
	msg := func(b []byte, off int64) ingest.Message {
		return ingest.Message{Partition: 2, Offset: off, Value: b, Time: now}
	}
	// A copy of tooLate that reached Kafka in time (its record stamped a
	// second after it), beside one stamped now.
	inTime := func(b []byte, off int64) ingest.Message {
		return ingest.Message{Partition: 2, Offset: off, Value: b, Time: tooLate.Time.Add(time.Second)}
	}
	for _, c := range []struct {
		name                       string
		msgs                       []ingest.Message
		events, late, rejected, du int
	}{
		{"a valid event lands", []ingest.Message{msg(encode(t, timely), 1)}, 1, 0, 0, 0},
		{"a second copy in the batch is dropped", []ingest.Message{msg(encode(t, timely), 1), msg(encode(t, timely), 2)}, 1, 0, 0, 1},
		{"copies within one second of the same time are one row", []ingest.Message{msg(encode(t, timely), 1), msg(encode(t, shifted(timely, time.Millisecond)), 2)}, 1, 0, 0, 1},
		// ClickHouse keeps the two as two rows whatever the batching, so
		// one batch must too: else a replay, batched differently, differs.
		{"the same id at another second is another row, as in ClickHouse", []ingest.Message{msg(encode(t, timely), 1), msg(encode(t, shifted(timely, time.Second)), 2)}, 2, 0, 0, 0},
		{"the same id of another type is another row, as in ClickHouse", []ingest.Message{msg(encode(t, timely), 1), msg(encode(t, retyped(timely, "tokens")), 2)}, 2, 0, 0, 0},
		{"a copy of the second type's row is dropped too", []ingest.Message{msg(encode(t, timely), 1), msg(encode(t, retyped(timely, "tokens")), 2), msg(encode(t, retyped(timely, "tokens")), 3), msg(encode(t, timely), 4)}, 2, 0, 0, 2},
		{"an event within the lateness lands", []ingest.Message{msg(encode(t, late), 1)}, 1, 0, 0, 0},
		{"an event beyond the lateness is set aside", []ingest.Message{msg(encode(t, tooLate), 1)}, 0, 1, 0, 0},
		// The on-time copy counts whatever the order, as it does when the
		// two land in different batches; landing finds the too-late copy
		// a copy of a counted event (InsertLate).
		{"a too-late copy first does not keep an on-time copy from counting", []ingest.Message{msg(encode(t, tooLate), 1), inTime(encode(t, tooLate), 2)}, 1, 1, 0, 0},
		{"a too-late copy after an on-time copy", []ingest.Message{inTime(encode(t, tooLate), 1), msg(encode(t, tooLate), 2)}, 1, 1, 0, 0},
		{"a second too-late copy in the batch is dropped", []ingest.Message{msg(encode(t, tooLate), 1), msg(encode(t, tooLate), 2)}, 0, 1, 0, 1},
		{"bytes that are not an event are rejected", []ingest.Message{msg([]byte("{"), 1)}, 0, 0, 1, 0},
		{"an event with an invalid field is rejected", []ingest.Message{msg([]byte(`{"v":2}`), 1)}, 0, 0, 1, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			events, lt, rej, dups := ingest.Split(c.msgs, now, ingest.DefaultMaxLateness)
			if len(events) != c.events || len(lt) != c.late || len(rej) != c.rejected || dups != c.du {
				t.Errorf("events %d late %d rejected %d dups %d; want %d %d %d %d",
					len(events), len(lt), len(rej), dups, c.events, c.late, c.rejected, c.du)
			}
			for _, r := range rej {
				if r.Reason == "" || r.Message.Partition != 2 || r.Message.Offset != 1 {
					t.Errorf("rejected record lost its reason or origin: %+v", r)
				}
			}
			for _, r := range lt {
				if string(r.Value) != string(c.msgs[r.Offset-1].Value) {
					t.Errorf("too-late event lost its original bytes")
				}
			}
		})
	}
}

// TestSplitKeepsEachEventWhole: Split decodes every event in place in its
// batch and gives the slot back when the event is not kept, so a kept
// event must carry nothing of a malformed, duplicate or too-late one
// decoded before it in the same slot.
func TestSplitKeepsEachEventWhole(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	full := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_full", Environment: schemas.Test,
		KeyID: "key_full", Type: "tokens", Time: now.Add(-time.Second), Route: "/v1/full", Method: "POST", Status: 201,
		LatencyMicros: 7, ResponseBytes: 9, Units: 3, Dimensions: map[string]string{"model": "large"}}
	bare := func() schemas.Event {
		return schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "a", Environment: schemas.Live,
			KeyID: "k", Type: "api_call", Time: now.Add(-time.Second), Units: 1}
	}
	tooLate := full
	tooLate.ID, tooLate.Time = schemas.NewEventID(), now.Add(-36*24*time.Hour)
	kept := []schemas.Event{full, bare(), bare(), bare()}
	values := [][]byte{
		encode(t, kept[0]),
		encode(t, kept[0]), // a duplicate, decoded whole into the next slot
		encode(t, kept[1]),
		[]byte(`{"v":1,"account_id":"acct_partial","route":"/v1/partial","units":5,"dimensions":{"x":"y"},"status":`), // malformed, partly decoded
		encode(t, kept[2]),
		encode(t, tooLate),
		encode(t, kept[3]),
	}
	var msgs []ingest.Message
	for i, v := range values {
		msgs = append(msgs, ingest.Message{Partition: 1, Offset: int64(i), Value: v, Time: now})
	}
	events, late, rej, dups := ingest.Split(msgs, now, ingest.DefaultMaxLateness)
	if len(events) != len(kept) || len(late) != 1 || len(rej) != 1 || dups != 1 {
		t.Fatalf("events %d late %d rejected %d dups %d; want %d 1 1 1", len(events), len(late), len(rej), dups, len(kept))
	}
	for i, r := range events {
		want := kept[i]
		want.Time = want.Time.UTC().Truncate(time.Microsecond)
		keys, vals := r.DimensionArrays()
		wk, wv := want.DimensionArrays()
		if len(wk) == 0 {
			wk, wv = nil, nil // no dimensions, however each side spells it
		}
		got := r.Event
		got.Dimensions, want.Dimensions = nil, nil
		if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(keys, wk) || !reflect.DeepEqual(vals, wv) {
			t.Errorf("event %d: got %+v %q %q, want %+v %q %q", i, got, keys, vals, want, wk, wv)
		}
	}
	if late[0].Event.ID != tooLate.ID || late[0].Offset != 5 || string(late[0].Value) != string(values[5]) {
		t.Errorf("too-late event: %+v, want id %s from offset 5 with its bytes", late[0].Event, tooLate.ID)
	}
}

// TestSplitIsTheSameWhicheverClockReadsIt: a record is judged by its own
// Kafka timestamp, so a batch redelivered to an ingest process whose clock
// differs splits as it did the first time.
func TestSplitIsTheSameWhicheverClockReadsIt(t *testing.T) {
	recordTime := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	ev := func(at time.Time) []byte {
		return encode(t, schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "a", Environment: schemas.Live,
			KeyID: "k", Type: "api_call", Time: at, Units: 1})
	}
	msgs := []ingest.Message{
		{Partition: 0, Offset: 1, Value: ev(recordTime.Add(4 * time.Minute)), Time: recordTime}, // within the skew of its record
		{Partition: 0, Offset: 2, Value: ev(recordTime.Add(6 * time.Minute)), Time: recordTime}, // beyond it
	}
	for _, clock := range []time.Duration{-3 * time.Minute, 0, 3 * time.Minute, 24 * time.Hour} {
		events, late, rej, _ := ingest.Split(msgs, recordTime.Add(clock), ingest.DefaultMaxLateness)
		if len(events) != 1 || events[0].Offset != 1 || len(late) != 0 || len(rej) != 1 || rej[0].Message.Offset != 2 {
			t.Errorf("ingest clock %s from the records' time: %d events, %d late, %d rejected; want offset 1 landed and offset 2 rejected",
				clock, len(events), len(late), len(rej))
		}
	}
}

// TestSplitKeepsDimensionsSorted: Split hands the sink each event's
// dimensions as key-sorted arrays (it decodes them without a map), the same
// arrays an event carrying them as a map gives.
func TestSplitKeepsDimensionsSorted(t *testing.T) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	dims := []map[string]string{nil, {"region": "eu"}, {"zone": "a", "model": "large", "region": "us", "b": ""}}
	var msgs []ingest.Message
	var want []schemas.Event
	for i, d := range dims {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "a", Environment: schemas.Live,
			KeyID: "k", Type: "api_call", Time: now.Add(-time.Second), Units: 1, Dimensions: d}
		msgs = append(msgs, ingest.Message{Offset: int64(i), Value: encode(t, e), Time: now})
		want = append(want, e)
	}
	events, _, _, _ := ingest.Split(msgs, now, ingest.DefaultMaxLateness)
	if len(events) != len(dims) {
		t.Fatalf("%d events, want %d", len(events), len(dims))
	}
	for i, r := range events {
		keys, values := r.DimensionArrays()
		wk, wv := want[i].DimensionArrays()
		if len(keys) != len(wk) || len(values) != len(wv) {
			t.Fatalf("event %d: dimensions %q %q, want %q %q", i, keys, values, wk, wv)
		}
		for j := range wk {
			if keys[j] != wk[j] || values[j] != wv[j] {
				t.Fatalf("event %d: dimensions %q %q, want %q %q", i, keys, values, wk, wv)
			}
		}
		// A record built from an event with a map gives the same.
		byMap := ingest.Record{Event: want[i]}
		if mk, _ := byMap.DimensionArrays(); len(mk) != len(wk) {
			t.Fatalf("event %d: a record with the map gives %q", i, mk)
		}
	}
}

type fakeOffsets map[int]ingest.PartitionOffsets

func (f fakeOffsets) Offsets(context.Context) (map[int]ingest.PartitionOffsets, error) { return f, nil }

// fakeWatermarks is a watermark store that, like ClickHouse, hands out
// copies and keeps the last row written per partition.
type fakeWatermarks struct {
	mu           sync.Mutex
	w            map[int]time.Time
	topic, group string
}

func (f *fakeWatermarks) Watermarks(context.Context) (map[int]time.Time, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[int]time.Time{}
	for p, t := range f.w {
		out[p] = t
	}
	return out, nil
}

func (f *fakeWatermarks) SetWatermarks(_ context.Context, w map[int]time.Time, _ time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for p, t := range w {
		f.w[p] = t
	}
	return nil
}

func (f *fakeWatermarks) WatermarkSource(context.Context) (string, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.topic, f.group, nil
}

func (f *fakeWatermarks) SetWatermarkSource(_ context.Context, topic, group string, _ time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.topic, f.group = topic, group
	return nil
}

func (f *fakeWatermarks) ResetWatermarks(_ context.Context, partitions []int, _ time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := map[int]time.Time{}
	for _, p := range partitions {
		w[p] = time.Unix(0, 0).UTC()
	}
	f.w = w
	return nil
}

func TestWatermarker(t *testing.T) {
	cfg := ingest.Config{}
	cfg.Defaults()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	past := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	store := &fakeWatermarks{w: map[int]time.Time{2: past}}
	offs := fakeOffsets{
		0: {Committed: 10, End: 10},          // caught up
		1: {Committed: 5, End: 10},           // behind, nothing landed by this process
		2: {Committed: 10, End: 10},          // caught up, but already ahead of now
		3: {Committed: -1, Start: 7, End: 7}, // never committed; retention deleted everything
		4: {Committed: -1, Start: 3, End: 7}, // never committed; four records left to read
		5: {Committed: 2, Start: 5, End: 5},  // committed, then retention deleted past it
	}
	w, err := ingest.NewWatermarker(cfg, offs, store, ingest.NewProgress(), log, nil)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now().Add(-cfg.WatermarkSkew - time.Second)
	if err := w.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Run("a caught-up partition's watermark is now minus the skew", func(t *testing.T) {
		if got := store.w[0]; got.Before(before) || got.After(time.Now()) {
			t.Errorf("partition 0 watermark %s", got)
		}
	})
	// Without a row, min(watermark) over the rows there are would call the
	// partition's usage complete while it is behind.
	t.Run("a partition behind with nothing landed here and no row gets the epoch", func(t *testing.T) {
		if got, ok := store.w[1]; !ok || !got.Equal(time.Unix(0, 0)) {
			t.Errorf("partition 1 watermark %s (present %v), want the epoch", got, ok)
		}
	})
	t.Run("a partition whose records were all deleted unread is caught up", func(t *testing.T) {
		if got := store.w[3]; got.Before(before) || got.After(time.Now()) {
			t.Errorf("partition 3 watermark %s, want now minus the skew", got)
		}
	})
	// The reader, finding nothing past the log start, commits nothing
	// more: measured from the commit, the lag stayed 3 and the watermark
	// at the epoch until a new record came.
	t.Run("a partition whose records past its commit were all deleted is caught up", func(t *testing.T) {
		if got := store.w[5]; got.Before(before) || got.After(time.Now()) {
			t.Errorf("partition 5 watermark %s, want now minus the skew", got)
		}
	})
	t.Run("a partition with records left after its deleted ones is behind", func(t *testing.T) {
		if got, ok := store.w[4]; !ok || !got.Equal(time.Unix(0, 0)) {
			t.Errorf("partition 4 watermark %s (present %v), want the epoch", got, ok)
		}
	})
	t.Run("a watermark never moves backwards", func(t *testing.T) {
		if got := store.w[2]; !got.Equal(past) {
			t.Errorf("partition 2 watermark %s, want %s", got, past)
		}
	})
	t.Run("once the partition catches up, its watermark moves on from the epoch", func(t *testing.T) {
		offs[1] = ingest.PartitionOffsets{Committed: 10, End: 10}
		if err := w.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := store.w[1]; got.Before(before) {
			t.Errorf("partition 1 watermark %s", got)
		}
	})
}

// retriable is an error that says to retry, as kafka-go's "not coordinator
// for group" does.
type retriable struct{}

func (retriable) Error() string   { return "not coordinator for group" }
func (retriable) Temporary() bool { return true }

// failingOffsets fails every call with err and counts the calls.
type failingOffsets struct {
	err   error
	calls chan struct{}
}

func (f failingOffsets) Offsets(context.Context) (map[int]ingest.PartitionOffsets, error) {
	select {
	case f.calls <- struct{}{}:
	default:
	}
	return nil, f.err
}

// levels records the level of every log record.
type levels struct {
	mu  sync.Mutex
	got []slog.Level
}

func (l *levels) Enabled(context.Context, slog.Level) bool { return true }
func (l *levels) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, r.Level)
	return nil
}
func (l *levels) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *levels) WithGroup(string) slog.Handler      { return l }

func (l *levels) count(level slog.Level) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, g := range l.got {
		if g == level {
			n++
		}
	}
	return n
}

func TestWatermarkerLogsOnlyLastingOrPermanentFailures(t *testing.T) {
	for _, c := range []struct {
		name        string
		err         error
		debug, warn bool
	}{
		{"a retriable failure is retried quietly", fmt.Errorf("fetch committed offsets: %w", retriable{}), true, false},
		{"any other failure is a warning at once", errors.New("connection refused"), false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := ingest.Config{WatermarkInterval: 5 * time.Millisecond}
			cfg.Defaults()
			h := &levels{}
			offs := failingOffsets{err: c.err, calls: make(chan struct{}, 1)}
			w, err := ingest.NewWatermarker(cfg, offs, &fakeWatermarks{w: map[int]time.Time{}}, ingest.NewProgress(), slog.New(h), nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { _ = w.Run(ctx); close(done) }()
			for range 5 {
				<-offs.calls
			}
			cancel()
			<-done
			if got := h.count(slog.LevelDebug) > 0; got != c.debug {
				t.Errorf("debug records: %d, want some: %v", h.count(slog.LevelDebug), c.debug)
			}
			if got := h.count(slog.LevelWarn) > 0; got != c.warn {
				t.Errorf("warnings: %d, want some: %v", h.count(slog.LevelWarn), c.warn)
			}
		})
	}
}

// Another process writes a later watermark for a partition (it was given
// the partition in a rebalance); this one's next refresh must not write its
// own smaller one over it.
func TestWatermarkerNeverWritesBelowAnotherProcesssWatermark(t *testing.T) {
	cfg := ingest.Config{}
	cfg.Defaults()
	store := &fakeWatermarks{w: map[int]time.Time{}}
	w, err := ingest.NewWatermarker(cfg, fakeOffsets{0: {Committed: 10, End: 10}}, store, ingest.NewProgress(),
		slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	tick := func() {
		if err := w.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	tick()
	if _, ok := store.w[0]; !ok {
		t.Fatal("a caught-up partition got no watermark")
	}
	later := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	_ = store.SetWatermarks(context.Background(), map[int]time.Time{0: later}, time.Now()) // the other process
	time.Sleep(1100 * time.Millisecond)                                                    // watermarks move by whole seconds
	tick()
	if got := store.w[0]; !got.Equal(later) {
		t.Fatalf("stored watermark %s, want the other process's %s kept", got, later)
	}
}

// BenchmarkSplit decodes a batch of the default size (40,000 records) of
// events shaped like bench/ingest's, 5 % of them repeated: ns/op is one
// batch, so divide by 40,000 for a record's share.
func BenchmarkSplit(b *testing.B) {
	now := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	const n = 40_000
	msgs := make([]ingest.Message, 0, n)
	for i := range n {
		if i%20 == 19 {
			msgs = append(msgs, msgs[i-7]) // a redelivered copy
			continue
		}
		acct := fmt.Sprintf("acct_%d", i%8)
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: schemas.Live,
			KeyID: "key_" + acct, Type: "api_call", Time: now.Add(-time.Duration(n-i) * time.Millisecond),
			Route: []string{"/v1/search", "/v1/items", "/v1/orders"}[i%3], Method: "GET", Status: 200,
			LatencyMicros: int64(1000 + i%5000), ResponseBytes: int64(200 + i%3000), Units: 1,
			Dimensions: map[string]string{"region": []string{"eu", "us"}[i%2]}}
		v, err := e.Encode()
		if err != nil {
			b.Fatal(err)
		}
		msgs = append(msgs, ingest.Message{Partition: i % 4, Offset: int64(i), Value: v, Time: now})
	}
	b.ReportAllocs()
	for b.Loop() {
		events, _, _, dups := ingest.Split(msgs, now, ingest.DefaultMaxLateness)
		if len(events)+dups != n {
			b.Fatalf("%d events and %d duplicates of %d records", len(events), dups, n)
		}
	}
}
