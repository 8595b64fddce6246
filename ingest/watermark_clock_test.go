package ingest_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
	ingestch "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// heldSink counts the events it lands; once held, it lands nothing more
// (ClickHouse slow) until its context ends.
type heldSink struct {
	n    atomic.Int64
	held atomic.Bool
}

func (s *heldSink) Insert(ctx context.Context, groups ...[]ingest.Record) error {
	if s.held.Load() {
		<-ctx.Done()
		return ctx.Err()
	}
	for _, g := range groups {
		s.n.Add(int64(len(g)))
	}
	return nil
}

func (s *heldSink) InsertLate(_ context.Context, r []ingest.Record) ([]ingest.Record, error) {
	return r, nil
}

type noDeadLetters struct{}

func (noDeadLetters) Reject(context.Context, []ingest.Rejected) error { return nil }

// A record stamped by a producer whose clock runs ahead (an edge 50
// minutes fast; Kafka 4 takes record times up to an hour ahead) must not
// put the watermark ahead of this process's clock: records written after
// it by edges with right clocks, not landed yet, would count as landed,
// and the invoicer would close their period without them. The watermark
// never moves back, so the error would stay.
func TestARecordTimeAheadOfTheClockDoesNotMoveTheWatermarkPastIt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ch := testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	group := topic + ".ingest"
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	event := func(at time.Time) []byte {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_clock", Environment: schemas.Live,
			KeyID: "key_clock", Type: "api_call", Time: at.UTC().Truncate(time.Microsecond), Units: 1}
		b, err := e.Encode()
		testenv.Must(t, err, "encode")
		return b
	}
	now := time.Now()
	testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: event(now), Time: now.Add(50 * time.Minute)}), "produce from a clock ahead")

	sink, prog := &heldSink{}, ingest.NewProgress()
	src := ingestkafka.NewSource(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, group)
	in, err := ingest.New(ingest.Config{Topic: topic, DeadLetter: topic + ".dlq", Group: group, Workers: 1,
		BatchSize: 1, BatchWait: 10 * time.Millisecond, RetryPeriod: 100 * time.Millisecond},
		ingest.Deps{Sources: []ingest.Source{src}, Sink: sink, DeadLetters: noDeadLetters{},
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Progress: prog})
	testenv.Must(t, err, "new ingester")
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = in.Run(rctx) }()
	defer func() { stop(); wg.Wait(); _ = src.Close() }()

	offsets := ingestkafka.NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, group)
	testenv.Wait(t, 60*time.Second, "the first record committed", func() bool {
		o, err := offsets.Offsets(ctx)
		return err == nil && o[0].Committed == 1
	})
	sink.held.Store(true)
	for range 3 {
		testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: event(time.Now())}), "produce")
	}
	cfg := ingest.Config{}
	cfg.Defaults()
	wm, err := ingest.NewWatermarker(cfg, offsets, ingestch.NewSink(ch.Conn), prog, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	testenv.Must(t, err, "watermarker")
	testenv.Must(t, wm.Tick(ctx), "tick")
	var through time.Time
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT min(watermark) FROM watermarks FINAL").Scan(&through), "read the watermark")
	if limit := time.Now().Add(-cfg.WatermarkSkew); through.After(limit) {
		t.Fatalf("usage complete through %s, past this process's clock less the skew (%s), with %d records not landed",
			through.UTC(), limit.UTC().Truncate(time.Second), 3)
	}
	if through.Before(now.Add(-cfg.WatermarkSkew - time.Minute)) {
		t.Fatalf("watermark %s: want the landed record's time, capped at now less the skew", through.UTC())
	}
}

// The watermarks are one row per partition number. When ingest.topic (or
// ingest.group) changes, the old topic's rows, caught up to now, must not
// stand for the new topic's partitions while their records wait to be
// read: the invoicer would close periods without them. The new topic's
// process takes the rows over from the epoch (and drops a partition the new
// topic lacks, which would otherwise hold every period open), and a process
// still running on the old topic writes no more.
func TestAnotherTopicsWatermarksDoNotStandForTheNewOnes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ch := testenv.NewClickHouse(t)
	old := testenv.NewTopic(t, 3)
	newTopic := old + ".v2"
	testenv.CreateTopic(t, newTopic, 2)
	store := ingestch.NewSink(ch.Conn)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	watermarker := func(topic string) *ingest.Watermarker {
		cfg := ingest.Config{Topic: topic, Group: topic + ".ingest"}
		cfg.Defaults()
		w, err := ingest.NewWatermarker(cfg, ingestkafka.NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, cfg.Group),
			store, ingest.NewProgress(), log, nil)
		testenv.Must(t, err, "watermarker")
		return w
	}
	through := func() (time.Time, uint64) {
		var at time.Time
		var n uint64
		testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT min(watermark), count() FROM watermarks FINAL").Scan(&at, &n), "read the watermarks")
		return at.UTC(), n
	}
	oldW := watermarker(old)
	testenv.Must(t, oldW.Tick(ctx), "tick on the old topic") // empty, so caught up: now less the skew
	if at, n := through(); n != 3 || at.Before(time.Now().Add(-time.Minute)) {
		t.Fatalf("the old topic's watermarks: %s over %d partitions, want about now over 3", at, n)
	}
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: newTopic, RequiredAcks: kafka.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	for i := range 10 {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_moved", Environment: schemas.Live,
			KeyID: "key_moved", Type: "api_call", Time: time.Now().UTC().Truncate(time.Microsecond), Units: 1}
		b, err := e.Encode()
		testenv.Must(t, err, "encode")
		testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Key: []byte{byte(i)}, Value: b}), "produce to the new topic")
	}

	newW := watermarker(newTopic)
	testenv.Must(t, newW.Tick(ctx), "tick on the new topic, nothing of it landed")
	if at, _ := through(); !at.Equal(time.Unix(0, 0).UTC()) {
		t.Fatalf("usage complete through %s while the new topic's 10 records are unread; want the epoch", at)
	}
	testenv.Wait(t, 30*time.Second, "the partition the new topic lacks removed", func() bool {
		_, n := through()
		return n == 2
	})
	if err := oldW.Tick(ctx); err == nil {
		t.Fatal("the old topic's process went on writing watermarks after the new topic's took them over")
	}
	if at, _ := through(); !at.Equal(time.Unix(0, 0).UTC()) {
		t.Fatalf("usage complete through %s after the old topic's process ticked again; want the epoch still", at)
	}
}
