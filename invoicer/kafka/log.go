// Package kafka reads the usage topic as a log, from the start or from a
// time, up to the end it had when the read began: the input of a replay.
package kafka

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
)

// Message is one record of the topic.
type Message struct {
	Partition int
	Offset    int64
	Key       []byte
	Value     []byte
	Time      time.Time
}

// Log reads one topic without a consumer group: replay must not move the
// offsets ingest commits.
type Log struct {
	Brokers []string
	Topic   string
}

type span struct {
	partition  int
	start, end int64 // [start, end)
}

// Read calls fn with batches of up to batch messages of every partition,
// from the first record at or after since (zero: the start of the log) to
// the end offsets seen when Read began. progress, if not nil, is told the
// records read so far and the total to read.
func (l *Log) Read(ctx context.Context, since time.Time, batch int, fn func([]Message) error, progress func(done, total int64)) error {
	spans, err := l.spans(ctx, since)
	if err != nil {
		return err
	}
	var total, done int64
	for _, s := range spans {
		total += s.end - s.start
	}
	if progress != nil {
		progress(0, total)
	}
	for _, s := range spans {
		if s.end <= s.start {
			continue
		}
		r := kafka.NewReader(kafka.ReaderConfig{Brokers: l.Brokers, Topic: l.Topic, Partition: s.partition,
			MinBytes: 1, MaxBytes: 16 << 20, MaxWait: 200 * time.Millisecond, Dialer: kafkaconn.Dialer(10 * time.Second)})
		if err := r.SetOffset(s.start); err != nil {
			r.Close()
			return fmt.Errorf("seek partition %d: %w", s.partition, err)
		}
		buf := make([]Message, 0, batch)
		flush := func() error {
			if len(buf) == 0 {
				return nil
			}
			if err := fn(buf); err != nil {
				return err
			}
			done += int64(len(buf))
			if progress != nil {
				progress(done, total)
			}
			buf = buf[:0]
			return nil
		}
		for {
			m, err := r.FetchMessage(ctx)
			if err != nil {
				r.Close()
				return fmt.Errorf("read partition %d: %w", s.partition, err)
			}
			if m.Offset >= s.end {
				break
			}
			buf = append(buf, Message{Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value, Time: m.Time})
			if len(buf) == batch {
				if err := flush(); err != nil {
					r.Close()
					return err
				}
			}
			if m.Offset == s.end-1 {
				break
			}
		}
		err := flush()
		r.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func (l *Log) spans(ctx context.Context, since time.Time) ([]span, error) {
	if len(l.Brokers) == 0 {
		return nil, errors.New("no kafka brokers")
	}
	conn, err := kafka.DialContext(ctx, "tcp", l.Brokers[0])
	if err != nil {
		return nil, fmt.Errorf("connect to kafka: %w", err)
	}
	parts, err := conn.ReadPartitions(l.Topic)
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("list partitions of %s: %w", l.Topic, err)
	}
	var out []span
	for _, p := range parts {
		lc, err := kafka.DialLeader(ctx, "tcp", net.JoinHostPort(p.Leader.Host, strconv.Itoa(p.Leader.Port)), l.Topic, p.ID)
		if err != nil {
			return nil, fmt.Errorf("connect to leader of partition %d: %w", p.ID, err)
		}
		first, last, err := lc.ReadOffsets()
		if err == nil && !since.IsZero() {
			var at int64
			if at, err = lc.ReadOffset(since); err == nil {
				if at < 0 { // nothing at or after since
					at = last
				}
				first = max(first, at)
			}
		}
		lc.Close()
		if err != nil {
			return nil, fmt.Errorf("read offsets of partition %d: %w", p.ID, err)
		}
		out = append(out, span{partition: p.ID, start: first, end: last})
	}
	return out, nil
}
