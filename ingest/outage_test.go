package ingest_test

import (
	"context"
	"io"
	"log/slog"
	"net"
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

// An ingest worker whose Kafka is out of reach waits and fetches again,
// however long the outage lasts, and lands what waited once Kafka is back.
// kafka-go's reader hands the error back after a few attempts; the worker
// used to return it, which stopped ingest within about ten seconds (and,
// under tollgate all, the edge with it).
func TestIngestOutlivesAKafkaOutage(t *testing.T) {
	ctx := context.Background()
	ch := testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	dlq := topic + ".dlq"
	testenv.CreateTopic(t, dlq, 1)
	const total = 50
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll}
	msgs := make([]kafka.Message, total)
	for i := range msgs {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_outage", Environment: schemas.Live,
			KeyID: "key_outage", Type: "api_call", Time: time.Now().UTC().Add(-time.Duration(i) * time.Second), Units: 1}
		e.Normalize()
		b, err := e.Encode()
		testenv.Must(t, err, "encode event")
		msgs[i] = kafka.Message{Value: b}
	}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "produce")
	testenv.Must(t, w.Close(), "close the writer")

	// The worker knows Kafka by an address where nothing listens yet: a
	// broker out of reach. (Once it reaches the broker there, the broker
	// names its own address, so that one serves the first contact only.)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "find a free port")
	bootstrap := ln.Addr().String()
	testenv.Must(t, ln.Close(), "free the port")

	src := ingestkafka.NewSource([]string{bootstrap}, kafkaconn.Security{}, topic, topic+".ingest")
	t.Cleanup(func() { _ = src.Close() })
	dl := ingestkafka.NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, topic)
	t.Cleanup(func() { _ = dl.Close() })
	reg := prometheus.NewRegistry()
	in, err := ingest.New(ingest.Config{Topic: topic, DeadLetter: dlq, Group: topic + ".ingest", Workers: 1,
		BatchWait: 50 * time.Millisecond, RetryPeriod: 100 * time.Millisecond},
		ingest.Deps{Sources: []ingest.Source{src}, Sink: ingestch.NewSink(ch.Conn), DeadLetters: dl,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Registry: reg})
	testenv.Must(t, err, "new ingester")
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- in.Run(runCtx) }()

	// kafka-go gives a fetch up after a few attempts, about 10 s in.
	testenv.Wait(t, time.Minute, "the worker to retry a failed fetch", func() bool {
		return counterValue(t, reg, "tollgate_ingest_retries_total", "step", "fetch") >= 1
	})
	select {
	case err := <-done:
		t.Fatalf("ingest stopped during the outage: %v", err)
	default:
	}

	// Kafka is back at that address.
	ln, err = net.Listen("tcp", bootstrap)
	testenv.Must(t, err, "listen on the bootstrap address again")
	t.Cleanup(func() { _ = ln.Close() })
	go forward(ln, testenv.KafkaBrokers()[0])
	testenv.Wait(t, time.Minute, "every event landed after the outage", func() bool {
		var n uint64
		return ch.Conn.QueryRow(ctx, "SELECT count() FROM usage_events FINAL").Scan(&n) == nil && n == total
	})
	stop()
	if err := <-done; err != nil {
		t.Fatalf("ingest stopped with %v", err)
	}
}

// forward passes each connection ln accepts on to target, until ln closes.
func forward(ln net.Listener, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			up, err := net.Dial("tcp", target)
			if err != nil {
				return
			}
			defer up.Close()
			go func() { _, _ = io.Copy(up, c) }()
			_, _ = io.Copy(c, up)
		}()
	}
}

// counterValue is the value of the counter family name's series whose
// label is value in reg (0 when there is none).
func counterValue(t *testing.T, reg prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather metrics")
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
