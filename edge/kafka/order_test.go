package kafka

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Events reach Kafka in the order they were emitted, through the spool:
// those Kafka refused are spooled and drained first, and the ones emitted
// while the spool still holds some go behind them, not past them. (The
// other fault tests compare sets of ids; this one reads the partition in
// order.)
func TestTheSpoolDrainsInEmitOrder(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	topic := "usage.order." + testenv.Name(t)
	p, err := NewProducer(Config{Brokers: brokers, Topic: topic, SpoolDir: t.TempDir(), QueueSize: 100,
		BatchSize: 50, CloseTimeout: 10 * time.Second, WriteTimeout: 2 * time.Second}, nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer p.Close()
	seq := 0
	emit := func(n int) {
		for range n {
			ev := UsageEvent("acct_order") // one account: one partition, in order
			ev.RequestID = strconv.Itoa(seq)
			seq++
			p.Emit(ev)
		}
	}
	// The topic does not exist yet: Kafka refuses every write, and the
	// events go to the spool.
	emit(300)
	testenv.Wait(t, 30*time.Second, "300 events spooled", func() bool { return p.SpoolDepth() == 300 })
	testenv.CreateTopic(t, topic, 1) // deleted when the test ends
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	// More come while the spool drains.
	for range 20 {
		emit(10)
		time.Sleep(5 * time.Millisecond)
	}
	testenv.Wait(t, 60*time.Second, "the spool drained", func() bool { return p.SpoolDepth() == 0 })
	testenv.Must(t, p.Close(), "close producer")

	r := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, Topic: topic, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := 0; i < seq; i++ {
		m, err := r.FetchMessage(ctx)
		testenv.Must(t, err, "read event "+strconv.Itoa(i))
		ev, err := schemas.Decode(m.Value, time.Now().Add(time.Hour))
		testenv.Must(t, err, "decode event")
		if ev.RequestID != strconv.Itoa(i) {
			t.Fatalf("record %d of the partition is event %s: out of emit order", i, ev.RequestID)
		}
	}
	if last, err := client.ListOffsets(context.Background(), &kafka.ListOffsetsRequest{
		Topics: map[string][]kafka.OffsetRequest{topic: {kafka.LastOffsetOf(0)}}}); err != nil || last.Topics[topic][0].LastOffset != int64(seq) {
		t.Fatalf("the partition ends at %+v (%v), want %d events", last, err, seq)
	}
}

// A spool segment removed from the spool directory while the edge runs (a
// clean-up of what looked like an empty file) loses only the events it
// held, and says so: before, every event spooled after it went on into the
// removed file, counted as spooled and never read, and the drain set the
// depth back to 0 without a word.
func TestASpoolSegmentRemovedByHandLosesOnlyWhatItHeldAndSaysSo(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	topic := "usage.removed." + testenv.Name(t)
	dir := t.TempDir()
	p, err := NewProducer(Config{Brokers: brokers, Topic: topic, SpoolDir: dir, QueueSize: 100,
		BatchSize: 50, CloseTimeout: 10 * time.Second, WriteTimeout: 2 * time.Second}, nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer p.Close()
	emit := func(from, n int) {
		for i := range n {
			ev := UsageEvent("acct_removed")
			ev.RequestID = strconv.Itoa(from + i)
			p.Emit(ev)
		}
	}
	// The topic does not exist yet: the events go to the spool.
	emit(0, 100)
	testenv.Wait(t, 30*time.Second, "100 events spooled", func() bool { return p.SpoolDepth() == 100 })
	segs, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	testenv.Must(t, err, "list the spool's segments")
	for _, s := range segs {
		testenv.Must(t, os.Remove(s), "remove a segment")
	}
	emit(100, 100)
	testenv.Wait(t, 30*time.Second, "100 more events spooled", func() bool { return testutil.ToFloat64(p.spooled) >= 200 })
	testenv.CreateTopic(t, topic, 1) // deleted when the test ends
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	testenv.Wait(t, 60*time.Second, "the spool drained", func() bool { return p.SpoolDepth() == 0 })
	testenv.Must(t, p.Close(), "close producer")

	if lost := testutil.ToFloat64(p.Lost()); lost != 100 {
		t.Errorf("%v events counted lost, want the 100 the removed segment held", lost)
	}
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, Topic: topic, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := 100; i < 200; i++ {
		m, err := r.FetchMessage(ctx)
		testenv.Must(t, err, "read event "+strconv.Itoa(i))
		ev, err := schemas.Decode(m.Value, time.Now().Add(time.Hour))
		testenv.Must(t, err, "decode event")
		if ev.RequestID != strconv.Itoa(i) {
			t.Fatalf("record %d of the partition is event %s, want the events spooled after the removal, in order", i-100, ev.RequestID)
		}
	}
	if last, err := client.ListOffsets(context.Background(), &kafka.ListOffsetsRequest{
		Topics: map[string][]kafka.OffsetRequest{topic: {kafka.LastOffsetOf(0)}}}); err != nil || last.Topics[topic][0].LastOffset != 100 {
		t.Fatalf("the partition ends at %+v (%v), want 100 events", last, err)
	}
}
