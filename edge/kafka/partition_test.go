package kafka_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// One partition refusing writes holds up no other: events Kafka refuses
// for one partition go back to the spool's end while the events behind
// them reach their own partitions, and once the partition takes writes
// again every event is in the topic exactly once.
//
// The refusing partition is made with the topic's max.message.bytes: one
// account's events are each larger than it (sixteen long dimensions), so
// every write of theirs to their partition is refused, as writes to a
// partition whose leader is down or short of in-sync replicas are, while
// the other accounts' small events fit.
func TestOnePartitionRefusingWritesHoldsUpNoOther(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	ctx := context.Background()
	res, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 4,
		ReplicationFactor: 1, ConfigEntries: []kafka.ConfigEntry{{ConfigName: "max.message.bytes", ConfigValue: "4000"}}}}})
	testenv.Must(t, err, "create topic")
	testenv.Must(t, res.Errors[topic], "create topic")
	t.Cleanup(func() {
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	})

	// The large account, and three small ones on the other partitions.
	partitionOf := func(account string) int {
		return (&kafka.Hash{}).Balance(kafka.Message{Key: []byte(account)}, 0, 1, 2, 3)
	}
	big := "acct_big"
	var small []string
	for i := 0; len(small) < 3; i++ {
		if a := fmt.Sprintf("acct_small_%d", i); partitionOf(a) != partitionOf(big) {
			small = append(small, a)
		}
	}
	bigEvent := func() schemas.Event {
		ev := edgekafka.UsageEvent(big)
		ev.Dimensions = map[string]string{}
		for d := range schemas.MaxDimensions {
			ev.Dimensions[fmt.Sprintf("d%02d", d)] = strings.Repeat("x", schemas.MaxDimensionValue)
		}
		return ev
	}

	reg := prometheus.NewRegistry()
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: t.TempDir(),
		CloseTimeout: 5 * time.Second}, reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer func() { testenv.Must(t, p.Close(), "close producer") }()

	want := map[string]bool{}
	for range 5 {
		ev := bigEvent()
		want[ev.ID.String()] = true
		p.Emit(ev)
	}
	testenv.Wait(t, 15*time.Second, "the large events refused and spooled", func() bool { return p.SpoolDepth() >= 5 })
	for i := range 60 {
		ev := edgekafka.UsageEvent(small[i%len(small)])
		want[ev.ID.String()] = true
		p.Emit(ev)
		time.Sleep(10 * time.Millisecond)
	}
	// Every small event reaches the topic while the large ones are still
	// refused.
	evs := edgetest.ReadTopic(t, brokers, topic, 60, 20*time.Second)
	if len(evs) != 60 {
		t.Fatalf("%d events in the topic while one partition refuses writes; want the 60 of the other partitions", len(evs))
	}
	for _, e := range evs {
		if e.AccountID == big {
			t.Fatalf("a large event reached the topic through a limit it is over")
		}
	}
	if n := edgekafka.MetricValue(t, reg, "tollgate_edge_events_requeued_total"); n < 5 {
		t.Fatalf("tollgate_edge_events_requeued_total %v, want at least the 5 large events", n)
	}
	if h := p.SpoolHold(); h.Since.IsZero() || !h.Released.IsZero() {
		t.Fatalf("hold %+v while the large events wait in the spool; want one held", h)
	}

	// The partition takes writes again.
	ar, err := client.AlterConfigs(ctx, &kafka.AlterConfigsRequest{Resources: []kafka.AlterConfigRequestResource{{
		ResourceType: kafka.ResourceTypeTopic, ResourceName: topic,
		Configs: []kafka.AlterConfigRequestConfig{{Name: "max.message.bytes", Value: "1048588"}}}}})
	testenv.Must(t, err, "raise max.message.bytes")
	for _, e := range ar.Errors {
		testenv.Must(t, e, "raise max.message.bytes")
	}
	testenv.Wait(t, 30*time.Second, "the spool empty", func() bool { return p.SpoolDepth() == 0 })
	evs = edgetest.ReadTopic(t, brokers, topic, len(want), 20*time.Second)
	seen := map[string]bool{}
	for _, e := range evs {
		id := e.ID.String()
		if seen[id] || !want[id] {
			t.Fatalf("event %s in the topic twice, or never emitted", id)
		}
		seen[id] = true
	}
	if len(seen) != len(want) {
		t.Fatalf("%d distinct events in the topic, want %d", len(seen), len(want))
	}
	testenv.Wait(t, 10*time.Second, "the hold released", func() bool { return !p.SpoolHold().Released.IsZero() })
}
