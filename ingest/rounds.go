package ingest

import (
	"context"
	"sync"
	"time"
)

// Rounds gathers the records of many callers into rounds, group-commit
// style: records handed to Join while a round is being served go into the
// next one, and each caller waits for the outcome of the round that took
// its records. SharedSink (raw inserts) and the aggregator's rollup
// coalescer are its two users.
type Rounds struct {
	wake     chan struct{}
	done     chan struct{}
	closeErr error
	settle   time.Duration
	stopOnce sync.Once

	mu      sync.Mutex
	pending [][]Record
	waiters []chan<- error
}

// NewRounds returns an empty queue; closeErr is what callers waiting when
// it stops are told. A round starts settle after its first records came,
// for callers that tend to arrive together (the batches of one shared raw
// insert) to share it.
func NewRounds(closeErr error, settle time.Duration) *Rounds {
	return &Rounds{wake: make(chan struct{}, 1), done: make(chan struct{}), closeErr: closeErr, settle: settle}
}

// Join adds records to the next round and waits for that round's outcome.
// The records are kept as the caller's slices, never copied: a busy
// round carries tens of thousands of them.
func (r *Rounds) Join(ctx context.Context, groups ...[]Record) error {
	ch := make(chan error, 1)
	r.mu.Lock()
	r.pending = append(r.pending, groups...)
	r.waiters = append(r.waiters, ch)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-r.done:
		return r.closeErr
	}
}

// Next waits until records are pending and takes them all, with the
// channels their callers wait on (each takes exactly one error). It
// returns false when ctx ends.
func (r *Rounds) Next(ctx context.Context) ([][]Record, []chan<- error, bool) {
	for {
		r.mu.Lock()
		n := len(r.waiters)
		r.mu.Unlock()
		if n > 0 {
			if r.settle > 0 {
				select {
				case <-time.After(r.settle):
				case <-ctx.Done():
					return nil, nil, false
				}
			}
			r.mu.Lock()
			groups, waiters := r.pending, r.waiters
			r.pending, r.waiters = nil, nil
			r.mu.Unlock()
			return groups, waiters, true
		}
		select {
		case <-ctx.Done():
			return nil, nil, false
		case <-r.wake:
		}
	}
}

// Stop tells every caller still waiting, and every later one, closeErr.
// The goroutine serving rounds calls it when it returns.
func (r *Rounds) Stop() { r.stopOnce.Do(func() { close(r.done) }) }
