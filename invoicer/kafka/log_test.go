package kafka_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	invkafka "github.com/tollgate-dev/tollgate/invoicer/kafka"
)

func TestLogReadsFromTheStartOrFromATimeUpToItsEnd(t *testing.T) {
	topic := testenv.NewTopic(t, 3)
	ctx := context.Background()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, Balancer: &kafka.Hash{}, RequiredAcks: kafka.RequireAll}
	old := time.Now().Add(-48 * time.Hour).Truncate(time.Millisecond)
	recent := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	var msgs []kafka.Message
	for i := 0; i < 60; i++ {
		at := old
		if i >= 40 {
			at = recent
		}
		msgs = append(msgs, kafka.Message{Key: []byte(fmt.Sprint(i % 7)), Value: []byte(fmt.Sprint(i)), Time: at})
	}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "produce")
	testenv.Must(t, w.Close(), "close writer")

	l := &invkafka.Log{Brokers: testenv.KafkaBrokers(), Topic: topic}
	read := func(since time.Time) (map[string]bool, int64) {
		seen := map[string]bool{}
		var total int64
		err := l.Read(ctx, since, 7, func(ms []invkafka.Message) error {
			for _, m := range ms {
				if seen[string(m.Value)] {
					t.Fatalf("record %s read twice", m.Value)
				}
				seen[string(m.Value)] = true
			}
			return nil
		}, func(_, tot int64) { total = tot })
		testenv.Must(t, err, "read")
		return seen, total
	}
	t.Run("from the start every record is read once", func(t *testing.T) {
		seen, total := read(time.Time{})
		if len(seen) != 60 || total != 60 {
			t.Fatalf("read %d of %d", len(seen), total)
		}
	})
	t.Run("from a time only later records are read", func(t *testing.T) {
		seen, total := read(recent.Add(-time.Minute))
		if len(seen) != 20 || total != 20 || seen["0"] || !seen["59"] {
			t.Fatalf("read %d of %d: %v", len(seen), total, seen)
		}
	})
	t.Run("from the future nothing is read", func(t *testing.T) {
		seen, total := read(time.Now().Add(time.Hour))
		if len(seen) != 0 || total != 0 {
			t.Fatalf("read %d of %d", len(seen), total)
		}
	})
}
