package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

func TestEnsureTopicsReturnsOnlyOnceEveryPartitionTakesWrites(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	name := strings.ReplaceAll(testenv.Name(t), "_", ".")
	topics := []string{name, name + ".dlq"}
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, _ = client.DeleteTopics(ctx, &kafka.DeleteTopicsRequest{Topics: topics})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensureTopics(ctx, brokers, 4, topics...); err != nil {
		testenv.Unreachable(t, "Kafka", strings.Join(brokers, ","), err)
	}
	// One write to every partition of each new topic, with no retry: a
	// partition whose leader is not serving yet fails it.
	for _, topic := range topics {
		w := &kafka.Writer{
			Addr: kafka.TCP(brokers...), Topic: topic, RequiredAcks: kafka.RequireAll, MaxAttempts: 1,
			BatchTimeout: time.Millisecond,
			Balancer: kafka.BalancerFunc(func(m kafka.Message, partitions ...int) int {
				return int(m.Key[0]-'0') % len(partitions)
			}),
		}
		msgs := []kafka.Message{{Key: []byte("0")}, {Key: []byte("1")}, {Key: []byte("2")}, {Key: []byte("3")}}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			t.Errorf("write to every partition of %s right after ensureTopics: %v", topic, err)
		}
		_ = w.Close()
	}
	t.Run("a second call on existing topics returns at once", func(t *testing.T) {
		start := time.Now()
		if err := ensureTopics(ctx, brokers, 4, topics...); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("ensureTopics on existing topics took %s", d)
		}
	})
}
