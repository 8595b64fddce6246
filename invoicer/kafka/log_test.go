package kafka_test

import (
	"context"
	"fmt"
	"strings"
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

// TestLogSaysWhereItBeginsAndRefusesRecordsRemovedUnderIt: once retention
// has removed the oldest records, Retained gives the time of the first one
// held (replay must not claim to prove what came before), and a Read that
// finds records removed since Retained looked fails instead of reading on
// from what is left.
func TestLogSaysWhereItBeginsAndRefusesRecordsRemovedUnderIt(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx := context.Background()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll}
	base := time.Now().Add(-72 * time.Hour).Truncate(time.Millisecond)
	var msgs []kafka.Message
	for i := range 30 {
		msgs = append(msgs, kafka.Message{Value: []byte(fmt.Sprint(i)), Time: base.Add(time.Duration(i) * time.Hour)})
	}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "produce")
	testenv.Must(t, w.Close(), "close writer")
	readAll := func(l *invkafka.Log) (int, error) {
		n := 0
		err := l.Read(ctx, time.Time{}, 7, func(ms []invkafka.Message) error { n += len(ms); return nil }, nil)
		return n, err
	}

	l := &invkafka.Log{Brokers: testenv.KafkaBrokers(), Topic: topic}
	held, err := l.Retained(ctx)
	testenv.Must(t, err, "retained")
	if !held.IsZero() {
		t.Fatalf("a log that lost nothing begins at %s; want zero", held)
	}
	testenv.DeleteRecords(t, topic, 0, 10)
	t.Run("a Read after records were removed under it fails", func(t *testing.T) {
		n, err := readAll(l)
		if err == nil || !strings.Contains(err.Error(), "removed from the log while replay read it") {
			t.Fatalf("read %d records, %v; want it refused", n, err)
		}
	})
	t.Run("the log begins at the first record it holds", func(t *testing.T) {
		l := &invkafka.Log{Brokers: testenv.KafkaBrokers(), Topic: topic}
		held, err := l.Retained(ctx)
		testenv.Must(t, err, "retained")
		if want := base.Add(10 * time.Hour); !held.Equal(want) {
			t.Fatalf("the log begins at %s; want %s, the time of offset 10", held, want)
		}
		if n, err := readAll(l); err != nil || n != 20 {
			t.Fatalf("read %d records, %v; want the 20 held", n, err)
		}
	})
	t.Run("a log that lost every record begins now", func(t *testing.T) {
		testenv.DeleteRecords(t, topic, 0, 30)
		l := &invkafka.Log{Brokers: testenv.KafkaBrokers(), Topic: topic}
		before := time.Now()
		held, err := l.Retained(ctx)
		testenv.Must(t, err, "retained")
		if held.Before(before) {
			t.Fatalf("a log that holds none of its records begins at %s; want now", held)
		}
	})
}
