package ingest_test

import (
	"context"
	"io"
	"log/slog"
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

// TestALateCopyOfAnEventStillLandingIsADuplicate: an event lands in time,
// and a copy of it (an edge or client retry) reaches Kafka more than the
// allowed lateness later, in the next batch. The copy is a duplicate, not
// a late event, even while the first copy's insert is still on its way
// (batches land concurrently).
func TestALateCopyOfAnEventStillLandingIsADuplicate(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	dlq := topic + ".dlq"
	testenv.CreateTopic(t, dlq, 1)
	ctx := context.Background()

	now := time.Now().UTC()
	at := now.Add(-36 * 24 * time.Hour)
	e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_late_copy", Environment: schemas.Live,
		KeyID: "key_late_copy", Type: "api_call", Time: at, Units: 1}
	e.Normalize()
	b, err := e.Encode()
	testenv.Must(t, err, "encode event")
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll}
	defer w.Close()
	// The first copy's record is as old as the event: in time. The second,
	// the same bytes, is stamped now: 36 days after the event.
	testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: b, Time: at.Add(time.Second)}), "produce first copy")
	testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: b, Time: now}), "produce late copy")

	group := topic + ".ingest"
	src := ingestkafka.NewSource(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, group)
	t.Cleanup(func() { _ = src.Close() })
	dl := ingestkafka.NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, topic)
	t.Cleanup(func() { _ = dl.Close() })
	sink := &gatedSink{Sink: ingestch.NewSink(ch.Conn), open: make(chan struct{})}
	reg := prometheus.NewRegistry()
	cfg := ingest.Config{Topic: topic, DeadLetter: dlq, Group: group, Workers: 1, BatchSize: 1, BatchWait: 10 * time.Millisecond,
		MaxInFlight: 4, MaxInFlightRecords: 4}
	in, err := ingest.New(cfg, ingest.Deps{Sources: []ingest.Source{src}, Sink: sink, DeadLetters: dl,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Registry: reg})
	testenv.Must(t, err, "new ingester")
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- in.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("ingest stopped with %v", err)
		}
	}()

	// The first copy's insert is held; the second copy's batch, read
	// next, has time to reach the late-event step.
	testenv.Wait(t, time.Minute, "the first copy's insert under way", func() bool {
		waiting, _ := sink.counts()
		return waiting == 1
	})
	time.Sleep(time.Second)
	close(sink.open)
	offsets := ingestkafka.NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, group)
	testenv.Wait(t, time.Minute, "both records committed", func() bool {
		offs, err := offsets.Offsets(ctx)
		return err == nil && offs[0].Committed == 2
	})
	var rows, late uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM usage_events FINAL").Scan(&rows), "count rows")
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM late_events FINAL").Scan(&late), "count late")
	if rows != 1 || late != 0 {
		t.Fatalf("usage_events holds %d rows and late_events %d; want the event counted once and no late event", rows, late)
	}
	// The counters move just after the commit.
	outcomes := map[string]float64{}
	testenv.Wait(t, 10*time.Second, "both records counted by outcome", func() bool {
		for _, o := range []string{"landed", "too_late", "duplicate_too_late"} {
			outcomes[o] = counterValue(t, reg, "tollgate_ingest_records_total", "outcome", o)
		}
		return outcomes["landed"]+outcomes["too_late"]+outcomes["duplicate_too_late"] == 2
	})
	if outcomes["landed"] != 1 || outcomes["too_late"] != 0 || outcomes["duplicate_too_late"] != 1 {
		t.Fatalf("records by outcome %v; want landed 1, too_late 0, duplicate_too_late 1", outcomes)
	}
}
