package ingest

import (
	"context"
	"errors"
	"sync"
)

// SharedSink lets every worker's batches share raw-table inserts: events
// handed to Insert while an insert runs go into the next one. ClickHouse
// then takes one block per round instead of one per worker batch, which
// keeps its part count and its latency low as workers are added. Insert
// returns only after an insert that includes the caller's events has
// succeeded; on failure every caller of that round retries, and the copies
// a partly written block leaves are collapsed by FINAL.
type SharedSink struct {
	Sink
	wake    chan struct{}
	stop    context.CancelFunc
	done    chan struct{}
	mu      sync.Mutex
	pending []Record
	waiters []chan error
}

// NewSharedSink starts the insert loop over s; Close stops it. InsertLate
// goes straight to s: too-late events are rare.
func NewSharedSink(s Sink) *SharedSink {
	ctx, cancel := context.WithCancel(context.Background())
	ss := &SharedSink{Sink: s, wake: make(chan struct{}, 1), stop: cancel, done: make(chan struct{})}
	go ss.loop(ctx)
	return ss
}

// Insert waits for a round that includes records.
func (s *SharedSink) Insert(ctx context.Context, records []Record) error {
	ch := make(chan error, 1)
	s.mu.Lock()
	s.pending = append(s.pending, records...)
	s.waiters = append(s.waiters, ch)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		return errors.New("ingest: shared sink closed")
	}
}

func (s *SharedSink) loop(ctx context.Context) {
	defer close(s.done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		}
		for {
			s.mu.Lock()
			recs, waiters := s.pending, s.waiters
			s.pending, s.waiters = nil, nil
			s.mu.Unlock()
			if len(waiters) == 0 {
				break
			}
			err := s.Sink.Insert(ctx, recs)
			for _, w := range waiters {
				w <- err
			}
		}
	}
}

// Close stops the insert loop.
func (s *SharedSink) Close() error {
	s.stop()
	<-s.done
	return nil
}
