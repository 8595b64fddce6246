package aggregator_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// recordingStore records the recomputes the Coalescer asks for. The SQL
// behind them is tested on ClickHouse (aggregator/clickhouse,
// internal/chcompat, the ingest exactness test); this test is about when
// and in what order they are asked for.
type recordingStore struct {
	aggregator.RollupStore
	mu    sync.Mutex
	calls []recompute
}

type recompute struct {
	g       aggregator.Granularity
	at      time.Time
	minutes map[time.Time]bool
}

func (s *recordingStore) CheckZone(context.Context, string) error { return nil }

func (s *recordingStore) Recompute(_ context.Context, rs []aggregator.Recompute) error {
	c := recompute{g: rs[0].Granularity, at: time.Now(), minutes: map[time.Time]bool{}}
	for _, r := range rs {
		for _, t := range r.Touched {
			c.minutes[t.Minute] = true
		}
	}
	time.Sleep(5 * time.Millisecond) // an INSERT takes a while
	s.mu.Lock()
	s.calls = append(s.calls, c)
	s.mu.Unlock()
	return nil
}

// TestDayAndMonthRecomputesShareRoundsWithinTheirGap lands 40 batches, one
// every 10 ms, each in a minute of its own. Minute and hour windows are
// recomputed as rounds come; day and month windows at most once per gap,
// each such recompute covering every round queued meanwhile. Every touched
// minute is recomputed at every level, each level after the finer one, and
// every caller returns only then.
func TestDayAndMonthRecomputesShareRoundsWithinTheirGap(t *testing.T) {
	store := &recordingStore{}
	roller := aggregator.NewRoller(aggregator.StaticMeters{meter.Default()}, aggregator.StaticZones{}, store,
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	c := aggregator.NewCoalescer(roller)
	defer c.Close()

	base := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	const batches = 40
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, batches)
	for i := range batches {
		time.Sleep(10 * time.Millisecond)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_1", Environment: schemas.Live,
				KeyID: "key_1", Type: "api_call", Units: 1, Time: base.Add(time.Duration(i) * time.Minute)}
			if err := c.Landed(context.Background(), []ingest.Record{{Event: ev}}); err != nil {
				errs <- fmt.Errorf("batch %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	elapsed := time.Since(start)

	store.mu.Lock()
	defer store.mu.Unlock()
	byLevel := map[aggregator.Granularity][]recompute{}
	for _, call := range store.calls {
		byLevel[call.g] = append(byLevel[call.g], call)
	}
	for _, g := range []aggregator.Granularity{aggregator.Day, aggregator.Month} {
		calls := byLevel[g]
		// One at once, then one per gap at most.
		if most := 1 + int(elapsed/(500*time.Millisecond)); len(calls) > most {
			t.Errorf("%s: %d recomputes in %s, want at most %d", g, len(calls), elapsed.Round(time.Millisecond), most)
		}
		for i := 1; i < len(calls); i++ {
			// Started 500 ms apart; recorded 5 ms after each start.
			if gap := calls[i].at.Sub(calls[i-1].at); gap < 490*time.Millisecond {
				t.Errorf("%s recomputes %d and %d only %s apart", g, i-1, i, gap)
			}
		}
	}
	// Every minute at every level, each after the finer level's first
	// recompute of it.
	for i := range batches {
		m := base.Add(time.Duration(i) * time.Minute)
		var prev time.Time
		for _, g := range aggregator.Granularities {
			first := time.Time{}
			for _, call := range byLevel[g] {
				if call.minutes[m] {
					first = call.at
					break
				}
			}
			if first.IsZero() {
				t.Fatalf("minute %s was never recomputed at the %s level", m.Format(time.TimeOnly), g)
			}
			if first.Before(prev) {
				t.Fatalf("minute %s: %s recomputed before the finer level", m.Format(time.TimeOnly), g)
			}
			prev = first
		}
	}
}

// requestStore keeps every request of every Recompute call.
type requestStore struct {
	aggregator.RollupStore
	calls [][]aggregator.Recompute
}

func (s *requestStore) CheckZone(context.Context, string) error { return nil }

func (s *requestStore) Recompute(_ context.Context, rs []aggregator.Recompute) error {
	s.calls = append(s.calls, rs)
	return nil
}

// TestMinuteWindowsAreRecomputedOncePerMeterInEveryZone lands one batch
// for accounts in three zones, with two meters on its event type. A minute
// is the same in every zone, so the minute level asks for one recompute per
// meter, holding every account's touched minutes, and the raw events are
// scanned once per meter rather than once per meter and zone; the hour,
// day and month levels, whose windows depend on the zone, ask for one per
// meter and zone.
func TestMinuteWindowsAreRecomputedOncePerMeterInEveryZone(t *testing.T) {
	store := &requestStore{}
	meters := aggregator.StaticMeters{meter.Default(),
		{Key: "bytes_out", EventType: "api_call", Aggregation: meter.Sum, Value: "response_bytes"}}
	zones := aggregator.StaticZones{"acct_tokyo": "Asia/Tokyo", "acct_kolkata": "Asia/Kolkata"}
	roller := aggregator.NewRoller(meters, zones, store, slog.New(slog.NewTextHandler(io.Discard, nil)))
	at := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	var batch []ingest.Record
	for i, acct := range []string{"acct_utc", "acct_tokyo", "acct_kolkata"} {
		batch = append(batch, ingest.Record{Event: schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct,
			Environment: schemas.Live, KeyID: "key_1", Type: "api_call", Units: 1, Time: at.Add(time.Duration(i) * time.Minute)}})
	}
	if err := roller.Landed(context.Background(), batch); err != nil {
		t.Fatal(err)
	}
	if len(store.calls) != len(aggregator.Granularities) {
		t.Fatalf("%d Recompute calls, want one per granularity (%d)", len(store.calls), len(aggregator.Granularities))
	}
	for i, rs := range store.calls {
		g := aggregator.Granularities[i]
		perMeter := map[string]int{}
		zonesSeen := map[string]bool{}
		touched := 0
		for _, r := range rs {
			if r.Granularity != g {
				t.Errorf("call %d: a %s request among %s ones", i, r.Granularity, g)
			}
			perMeter[r.Meter.Key]++
			zonesSeen[r.Zone] = true
			touched += len(r.Touched)
		}
		want := 3 // zones
		if g == aggregator.Minute {
			want = 1
		}
		for _, m := range meters {
			if perMeter[m.Key] != want {
				t.Errorf("%s: %d requests for meter %s, want %d", g, perMeter[m.Key], m.Key, want)
			}
		}
		if g == aggregator.Minute && (len(zonesSeen) != 1 || !zonesSeen["UTC"]) {
			t.Errorf("minute requests in zones %v, want UTC only", zonesSeen)
		}
		if touched != len(meters)*len(batch) {
			t.Errorf("%s: %d touched minutes over the requests, want %d (each event's minute once per meter)", g, touched, len(meters)*len(batch))
		}
	}
}
