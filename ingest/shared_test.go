package ingest_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/ingest"
)

// recordingSink records the inserts SharedSink makes. Inserting into
// ClickHouse is tested on ClickHouse (the exactness test, the sink's
// users); this test is about how callers share inserts.
type recordingSink struct {
	ingest.Sink
	mu     sync.Mutex
	starts []time.Time
	rows   int
	fail   error
}

func (s *recordingSink) Insert(_ context.Context, groups ...[]ingest.Record) error {
	s.mu.Lock()
	s.starts = append(s.starts, time.Now())
	for _, g := range groups {
		s.rows += len(g)
	}
	err := s.fail
	s.mu.Unlock()
	time.Sleep(5 * time.Millisecond) // an insert takes a while
	return err
}

func TestBatchesWithinTheInsertGapShareOneInsert(t *testing.T) {
	rec := &recordingSink{}
	ss := ingest.NewSharedSink(rec)
	defer ss.Close()
	const callers = 30
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		time.Sleep(20 * time.Millisecond)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- ss.Insert(context.Background(), make([]ingest.Record, 10))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("insert: %v", err)
		}
	}
	elapsed := time.Since(start)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.rows != callers*10 {
		t.Fatalf("%d rows inserted, want %d", rec.rows, callers*10)
	}
	if most := 1 + int(elapsed/(200*time.Millisecond)); len(rec.starts) > most {
		t.Fatalf("%d inserts in %s, want at most %d", len(rec.starts), elapsed.Round(time.Millisecond), most)
	}
	for i := 1; i < len(rec.starts); i++ {
		if gap := rec.starts[i].Sub(rec.starts[i-1]); gap < 200*time.Millisecond {
			t.Fatalf("inserts %d and %d started only %s apart", i-1, i, gap)
		}
	}
}

func TestEveryCallerOfAFailedInsertIsTold(t *testing.T) {
	boom := errors.New("clickhouse is down")
	rec := &recordingSink{fail: boom}
	ss := ingest.NewSharedSink(rec)
	defer ss.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 5)
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- ss.Insert(context.Background(), make([]ingest.Record, 1))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if !errors.Is(err, boom) {
			t.Fatalf("a caller got %v, want the insert's error", err)
		}
	}
}

func TestCallersArrivingWithinTheSettleShareARound(t *testing.T) {
	r := ingest.NewRounds(errors.New("stopped"), 200*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sizes := make(chan int, 10)
	go func() {
		defer r.Stop()
		for {
			groups, waiters, ok := r.Next(ctx)
			if !ok {
				return
			}
			sizes <- len(groups)
			for _, w := range waiters {
				w <- nil
			}
		}
	}()
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Join(context.Background(), make([]ingest.Record, 1)); err != nil {
				t.Errorf("join: %v", err)
			}
		}()
		time.Sleep(2 * time.Millisecond)
	}
	wg.Wait()
	if n := <-sizes; n != 5 {
		t.Fatalf("the first round took %d of the 5 callers that came within 10 ms", n)
	}
}
