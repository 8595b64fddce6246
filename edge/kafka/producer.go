// Package kafka delivers the edge's usage events to the Kafka usage topic.
package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Producer batches events in memory and writes them to Kafka with acks from
// every in-sync replica. Events are keyed by account id, so one account's
// events stay in order on one partition.
type Producer struct {
	w     *kafka.Writer
	log   *slog.Logger
	queue chan schemas.Event
	done  chan struct{}
	once  sync.Once
}

var _ edge.Emitter = (*Producer)(nil)

// NewProducer starts a producer for topic on brokers.
func NewProducer(brokers []string, topic string, log *slog.Logger) *Producer {
	p := &Producer{
		w: &kafka.Writer{
			Addr:         kafka.TCP(brokers...),
			Topic:        topic,
			Balancer:     &kafka.Hash{},
			RequiredAcks: kafka.RequireAll,
			BatchSize:    1000,
			BatchTimeout: 5 * time.Millisecond,
			MaxAttempts:  1, // retries are ours, so we see every failure
		},
		log:   log,
		queue: make(chan schemas.Event, 10000),
		done:  make(chan struct{}),
	}
	go p.run()
	return p
}

// Emit queues ev. When the queue is full it waits rather than drop.
func (p *Producer) Emit(ev schemas.Event) { p.queue <- ev }

func (p *Producer) run() {
	defer close(p.done)
	batch := make([]kafka.Message, 0, 1000)
	for ev := range p.queue {
		batch = append(batch[:0], message(ev))
	drain:
		for len(batch) < cap(batch) {
			select {
			case ev, ok := <-p.queue:
				if !ok {
					break drain
				}
				batch = append(batch, message(ev))
			default:
				break drain
			}
		}
		p.write(batch)
	}
}

// write retries until Kafka takes the batch.
func (p *Producer) write(batch []kafka.Message) {
	backoff := 50 * time.Millisecond
	for {
		err := p.w.WriteMessages(context.Background(), batch...)
		if err == nil {
			return
		}
		p.log.Warn("produce usage events", "n", len(batch), "err", err)
		time.Sleep(backoff)
		backoff = min(2*backoff, 2*time.Second)
	}
}

func message(ev schemas.Event) kafka.Message {
	b, err := ev.Encode()
	if err != nil {
		// Events are built by the edge from typed fields; encoding cannot fail.
		b = []byte(fmt.Sprintf(`{"error":%q}`, err))
	}
	return kafka.Message{Key: []byte(ev.AccountID), Value: b}
}

// Close delivers everything queued, then closes the connection.
func (p *Producer) Close() error {
	p.once.Do(func() { close(p.queue) })
	<-p.done
	return errors.Join(p.w.Close())
}
