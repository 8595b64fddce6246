package ingest_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
	ingestch "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// TestRecordsDeletedBeforeTheGroupReadThemDoNotHoldTheWatermark: a
// partition whose records retention deleted before the consumer group
// ever committed has nothing left to read, so its watermark moves on
// instead of staying at the epoch, which kept every period open.
func TestRecordsDeletedBeforeTheGroupReadThemDoNotHoldTheWatermark(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	ctx := context.Background()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll,
		BatchTimeout: 5 * time.Millisecond}
	defer w.Close()
	for i := range 5 {
		testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: fmt.Appendf(nil, "record %d", i)}), "produce")
	}
	// What retention does to old segments, at once: delete records before
	// offset 5, every record there is.
	testenv.DeleteRecords(t, topic, 0, 5)

	offsets := ingestkafka.NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".ingest")
	offs, err := offsets.Offsets(ctx)
	testenv.Must(t, err, "read offsets")
	if got := offs[0]; got != (ingest.PartitionOffsets{Committed: -1, Start: 5, End: 5}) {
		t.Fatalf("offsets %+v; want nothing committed, log start and end both 5", got)
	}
	cfg := ingest.Config{}
	cfg.Defaults()
	store := ingestch.NewSink(ch.Conn)
	wm, err := ingest.NewWatermarker(cfg, offsets, store, ingest.NewProgress(), slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	testenv.Must(t, err, "new watermarker")
	before := time.Now().Add(-cfg.WatermarkSkew - time.Second)
	testenv.Must(t, wm.Tick(ctx), "tick")
	got, err := store.Watermarks(ctx)
	testenv.Must(t, err, "read watermarks")
	if got[0].Before(before) {
		t.Fatalf("partition 0's watermark is %s; want about now minus the skew (%s), its records all being deleted", got[0], cfg.WatermarkSkew)
	}
}
