package kafka

import (
	"context"
	"log/slog"
	"strconv"
	"testing"
	"time"

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
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
		Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
	testenv.Must(t, err, "create topic")
	testenv.Must(t, res.Errors[topic], "create topic")
	t.Cleanup(func() {
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	})
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
