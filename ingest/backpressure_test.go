package ingest_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
	ingestch "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// gatedSink holds every insert into ClickHouse until the test opens the
// gate, and counts the records waiting at it: the records a worker holds
// in landing batches.
type gatedSink struct {
	ingest.Sink
	open chan struct{}
	// giveUp is how long the nth insert (from 1) takes to give up once its
	// context ends, as a driver tearing down a connection may: later
	// inserts take longer.
	giveUp time.Duration

	mu                  sync.Mutex
	waiting, max, calls int
}

func (g *gatedSink) Insert(ctx context.Context, groups ...[]ingest.Record) error {
	n := 0
	for _, grp := range groups {
		n += len(grp)
	}
	g.mu.Lock()
	g.waiting += n
	g.max = max(g.max, g.waiting)
	g.calls++
	call := g.calls
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.waiting -= n
		g.mu.Unlock()
	}()
	select {
	case <-g.open:
	case <-ctx.Done():
		time.Sleep(time.Duration(call) * g.giveUp)
		return ctx.Err()
	}
	return g.Sink.Insert(ctx, groups...)
}

func (g *gatedSink) counts() (waiting, max int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting, g.max
}

// gatedRun is a real ingest worker (one consumer group member, its topic
// holding total events over partitions) landing into ClickHouse through a
// gatedSink, running until stop; done yields Run's error.
type gatedRun struct {
	ch    *testenv.ClickHouse
	topic string
	group string
	sink  *gatedSink
	stop  context.CancelFunc
	done  chan error
}

func startGated(t *testing.T, total, partitions int, cfg ingest.Config, giveUp time.Duration) *gatedRun {
	t.Helper()
	g := &gatedRun{ch: testenv.NewClickHouse(t), topic: testenv.NewTopic(t, partitions)}
	dlq := g.topic + ".dlq"
	testenv.CreateTopic(t, dlq, 1)
	ctx := context.Background()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: g.topic, Balancer: &kafka.RoundRobin{},
		RequiredAcks: kafka.RequireAll, BatchSize: 1000, BatchTimeout: 5 * time.Millisecond}
	defer w.Close()
	now := time.Now().UTC()
	msgs := make([]kafka.Message, total)
	for i := range msgs {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_gated", Environment: schemas.Live,
			KeyID: "key_gated", Type: "api_call", Time: now.Add(-time.Duration(i) * time.Millisecond), Units: 1}
		e.Normalize()
		b, err := e.Encode()
		testenv.Must(t, err, "encode event")
		msgs[i] = kafka.Message{Value: b}
	}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "produce")

	g.group = g.topic + ".ingest"
	src := ingestkafka.NewSource(testenv.KafkaBrokers(), kafkaconn.Security{}, g.topic, g.group)
	t.Cleanup(func() { _ = src.Close() })
	dl := ingestkafka.NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, g.topic)
	t.Cleanup(func() { _ = dl.Close() })
	g.sink = &gatedSink{Sink: ingestch.NewSink(g.ch.Conn), open: make(chan struct{}), giveUp: giveUp}
	cfg.Topic, cfg.DeadLetter, cfg.Group, cfg.Workers = g.topic, dlq, g.group, 1
	in, err := ingest.New(cfg, ingest.Deps{Sources: []ingest.Source{src}, Sink: g.sink, DeadLetters: dl,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Registry: prometheus.NewRegistry()})
	testenv.Must(t, err, "new ingester")
	runCtx, stop := context.WithCancel(ctx)
	g.stop, g.done = stop, make(chan error, 1)
	go func() { g.done <- in.Run(runCtx) }()
	return g
}

// TestSlowClickHouseBoundsTheRecordsAWorkerHolds: with ClickHouse holding
// every insert, a worker stops fetching once max_in_flight_records are
// landing plus the batch it collected next, however many batches that is,
// and every record lands, and is committed, once ClickHouse answers.
func TestSlowClickHouseBoundsTheRecordsAWorkerHolds(t *testing.T) {
	const (
		total     = 3000
		batch     = 100
		inFlight  = 8
		maxRecs   = 200
		bound     = maxRecs + batch // what a worker may hold
		oldBound  = (inFlight + 1) * batch
		waitLimit = time.Minute
	)
	ctx := context.Background()
	g := startGated(t, total, 2, ingest.Config{BatchSize: batch, MaxInFlight: inFlight, MaxInFlightRecords: maxRecs,
		BatchWait: 50 * time.Millisecond}, 0)
	ch, topic, group, sink := g.ch, g.topic, g.group, g.sink
	defer func() {
		g.stop()
		if err := <-g.done; err != nil {
			t.Errorf("ingest stopped with %v", err)
		}
	}()

	// The worker fills what it may hold: more than max_in_flight_records
	// (the batch collected next lands too) ...
	testenv.Wait(t, waitLimit, fmt.Sprintf("more than %d records landing", maxRecs), func() bool {
		waiting, _ := sink.counts()
		return waiting > maxRecs
	})
	// ... and then stops: a while later it still holds no more than that
	// one batch more. Without the records bound it would go on to
	// max_in_flight + 1 batches (900 records).
	time.Sleep(time.Second)
	if _, most := sink.counts(); most > bound {
		t.Fatalf("the worker held %d records in landing batches; want at most max_in_flight_records + batch_size = %d (batches alone would allow %d)",
			most, bound, oldBound)
	}

	close(sink.open)
	offsets := ingestkafka.NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, group)
	testenv.Wait(t, waitLimit, "every offset committed", func() bool {
		offs, err := offsets.Offsets(ctx)
		if err != nil {
			return false
		}
		var n int64
		for _, o := range offs {
			n += max(o.Committed, 0)
		}
		return n == total
	})
	var rows uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM usage_events").Scan(&rows), "count rows")
	if rows != total {
		t.Fatalf("%d rows in ClickHouse; want %d", rows, total)
	}
	if _, most := sink.counts(); most > bound {
		t.Fatalf("the worker held %d records in landing batches; want at most %d", most, bound)
	}
}

func TestMaxInFlightRecordsDefaultsToFourBatchesAndHoldsAFullOne(t *testing.T) {
	c := ingest.Config{BatchSize: 500}
	c.Defaults()
	if c.MaxInFlightRecords != 2000 {
		t.Fatalf("max_in_flight_records defaulted to %d with batch_size 500; want 2000", c.MaxInFlightRecords)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	c.MaxInFlightRecords = 499
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "ingest.max_in_flight_records") {
		t.Fatalf("max_in_flight_records below batch_size: got %v; want an error naming ingest.max_in_flight_records", err)
	}
}

// TestStoppingWaitsForEveryLandingBatch: a worker stopped while it waits
// for room (max_in_flight_records) returns only once the batch it was
// waiting with has stopped landing too, so nothing it started outlives it
// (the process closes ClickHouse's connection next).
func TestStoppingWaitsForEveryLandingBatch(t *testing.T) {
	const (
		total   = 1000
		batch   = 100
		maxRecs = 200
	)
	g := startGated(t, total, 1, ingest.Config{BatchSize: batch, MaxInFlight: 8, MaxInFlightRecords: maxRecs,
		BatchWait: 50 * time.Millisecond, RetryPeriod: 10 * time.Millisecond}, 100*time.Millisecond)
	sink := g.sink
	// Two batches hold max_in_flight_records; the third lands while the
	// worker waits for room.
	testenv.Wait(t, time.Minute, fmt.Sprintf("more than %d records landing", maxRecs), func() bool {
		waiting, _ := sink.counts()
		return waiting > maxRecs
	})
	g.stop()
	if err := <-g.done; err != nil {
		t.Fatalf("ingest stopped with %v", err)
	}
	if waiting, _ := sink.counts(); waiting != 0 {
		t.Fatalf("ingest returned with inserts of %d records still running; a stopped worker must wait for every batch it started landing", waiting)
	}
}
