package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// stopping is a component that runs until its context ends and then
// returns err, as an edge that could not finish its calls by its deadline
// does.
type stopping struct{ err error }

func (s stopping) Run(ctx context.Context) error {
	<-ctx.Done()
	return s.err
}

func (stopping) Close() error { return nil }

// An error a component's Run returns while the process stops is reported
// and fails the process; it was dropped, and the process exited 0.
func TestAComponentsErrorOnStopIsReported(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the signal
	err := runComponents(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), []named{
		{"ingest", stopping{context.Canceled}},
		{"edge", stopping{errors.New("edge shutdown: context deadline exceeded")}},
	})
	if err == nil || !strings.Contains(err.Error(), "edge: edge shutdown: context deadline exceeded") || strings.Contains(err.Error(), "ingest") {
		t.Fatalf("runComponents = %v; want the edge's error on stop, and not the ingest's plain cancellation", err)
	}
}

// stuckClose is a component whose Close never returns, as an edge's did
// while its Postgres pool waited on a connection gone silent.
type stuckClose struct {
	stopping
	closed chan struct{}
}

func (s stuckClose) Close() error {
	<-s.closed
	return nil
}

// closed records that its Close ran.
type closed struct {
	stopping
	ran chan struct{}
}

func (c closed) Close() error {
	close(c.ran)
	return nil
}

// A Close that does not return in time is reported, and the components
// started before it are still stopped and closed; they were never reached.
func TestAStuckCloseDoesNotKeepTheOthersRunning(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the signal
	release := make(chan struct{})
	defer close(release)
	first := closed{ran: make(chan struct{})}
	err := runComponentsWithin(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), []named{
		{"ingest", first},
		{"edge", stuckClose{closed: release}},
	}, 200*time.Millisecond)
	select {
	case <-first.ran:
	default:
		t.Fatal("the component started first was never closed")
	}
	if err == nil || !strings.Contains(err.Error(), "edge: did not close within") {
		t.Fatalf("runComponents = %v; want the edge's Close reported", err)
	}
}
