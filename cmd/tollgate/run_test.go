package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
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
