// Package kafka reads the usage topic as a consumer group member and writes
// rejected records to the dead-letter topic.
package kafka

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
)

// Source is a consumer group reader with explicit commits.
type Source struct {
	r       *kafka.Reader
	pending map[ingestKey]kafka.Message
}

type ingestKey struct {
	partition int
	offset    int64
}

var _ ingest.Source = (*Source)(nil)

// NewSource joins group on topic.
func NewSource(brokers []string, topic, group string) *Source {
	return &Source{
		r: kafka.NewReader(kafka.ReaderConfig{
			Brokers:        brokers,
			Topic:          topic,
			GroupID:        group,
			MinBytes:       1,
			MaxBytes:       16 << 20,
			MaxWait:        100 * time.Millisecond,
			CommitInterval: 0, // commits are synchronous and explicit
			StartOffset:    kafka.FirstOffset,
		}),
		pending: map[ingestKey]kafka.Message{},
	}
}

// Fetch returns the next message without committing it.
func (s *Source) Fetch(ctx context.Context) (ingest.Message, error) {
	m, err := s.r.FetchMessage(ctx)
	if err != nil {
		return ingest.Message{}, err
	}
	s.pending[ingestKey{m.Partition, m.Offset}] = m
	return ingest.Message{Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value, Time: m.Time}, nil
}

// Commit commits the offsets after msgs.
func (s *Source) Commit(ctx context.Context, msgs ...ingest.Message) error {
	km := make([]kafka.Message, 0, len(msgs))
	for _, m := range msgs {
		k := ingestKey{m.Partition, m.Offset}
		if pm, ok := s.pending[k]; ok {
			km = append(km, pm)
		}
	}
	if err := s.r.CommitMessages(ctx, km...); err != nil {
		return fmt.Errorf("commit offsets: %w", err)
	}
	for _, m := range msgs {
		delete(s.pending, ingestKey{m.Partition, m.Offset})
	}
	return nil
}

// Close leaves the group.
func (s *Source) Close() error { return s.r.Close() }

// DeadLetters writes rejected records, with their reason and origin in
// headers and the original bytes untouched, to the dead-letter topic.
type DeadLetters struct {
	w     *kafka.Writer
	topic string
}

var _ ingest.DeadLetters = (*DeadLetters)(nil)

// NewDeadLetters writes to topic on brokers.
func NewDeadLetters(brokers []string, topic, sourceTopic string) *DeadLetters {
	return &DeadLetters{
		w: &kafka.Writer{
			Addr:         kafka.TCP(brokers...),
			Topic:        topic,
			RequiredAcks: kafka.RequireAll,
			BatchTimeout: time.Millisecond,
		},
		topic: sourceTopic,
	}
}

// Reject writes one dead letter.
func (d *DeadLetters) Reject(ctx context.Context, m ingest.Message, reason string) error {
	err := d.w.WriteMessages(ctx, kafka.Message{
		Key:   m.Key,
		Value: m.Value,
		Headers: []kafka.Header{
			{Key: "tollgate.reason", Value: []byte(reason)},
			{Key: "tollgate.source_topic", Value: []byte(d.topic)},
			{Key: "tollgate.source_partition", Value: []byte(strconv.Itoa(m.Partition))},
			{Key: "tollgate.source_offset", Value: []byte(strconv.FormatInt(m.Offset, 10))},
		},
	})
	if err != nil {
		return fmt.Errorf("write dead letter: %w", err)
	}
	return nil
}

// Close flushes and closes the writer.
func (d *DeadLetters) Close() error { return d.w.Close() }
