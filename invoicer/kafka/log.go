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
	// Security is how the brokers are reached: TLS and SASL (none when
	// zero).
	Security kafkaconn.Security
	Topic    string
	// first is each partition's first offset when Retained looked; Read
	// refuses to go on if records from there on have been removed since.
	first map[int]int64
}

type span struct {
	partition  int
	start, end int64 // [start, end)
	first      int64 // the first offset the partition holds
}

// Retained tells where the log begins now that retention (or a deletion
// of records) may have removed its oldest records: the time of the first
// record still held, the latest such time over the partitions that have
// lost records; zero when none has. A partition that has lost every
// record it had says the log begins now. Records past that time are all
// there to read; an event of an earlier period may not be.
func (l *Log) Retained(ctx context.Context) (time.Time, error) {
	parts, err := l.partitions(ctx)
	if err != nil {
		return time.Time{}, err
	}
	var from time.Time
	first := map[int]int64{}
	for _, p := range parts {
		lc, err := l.Security.Dialer(10*time.Second).DialLeader(ctx, "tcp", net.JoinHostPort(p.Leader.Host, strconv.Itoa(p.Leader.Port)), l.Topic, p.ID)
		if err != nil {
			return time.Time{}, fmt.Errorf("connect to leader of partition %d: %w", p.ID, err)
		}
		t, start, err := firstHeld(lc)
		lc.Close()
		if err != nil {
			return time.Time{}, fmt.Errorf("partition %d: %w", p.ID, err)
		}
		first[p.ID] = start
		if t.After(from) {
			from = t
		}
	}
	l.first = first
	return from, nil
}

// firstHeld is the first offset the partition of lc holds and, if records
// before it were removed, the time of the record there (now, when it holds
// none).
func firstHeld(lc *kafka.Conn) (time.Time, int64, error) {
	first, last, err := lc.ReadOffsets()
	if err != nil || first == 0 {
		return time.Time{}, first, err
	}
	if first >= last {
		return time.Now(), first, nil
	}
	if _, err := lc.Seek(first, kafka.SeekAbsolute); err != nil {
		return time.Time{}, first, err
	}
	if err := lc.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		return time.Time{}, first, err
	}
	b := lc.ReadBatch(1, 16<<20)
	m, err := b.ReadMessage()
	if cerr := b.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return time.Time{}, first, fmt.Errorf("read the first record held (offset %d): %w", first, err)
	}
	return m.Time, first, nil
}

// errRemoved says that records replay was to read were removed from the
// log while it ran; nothing it computed from the rest proves anything.
func errRemoved(partition int, from, to int64) error {
	return fmt.Errorf("partition %d: records at offsets %d to %d were removed from the log while replay read it (retention, or a deletion of records); run it again", partition, from, to)
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
		// Records Retained saw, and Read is to read from (the log's
		// start, not a later offset since asked for), are gone.
		if known, ok := l.first[s.partition]; ok && s.first > known && s.start == s.first {
			return errRemoved(s.partition, known, s.first-1)
		}
	}
	if progress != nil {
		progress(0, total)
	}
	for _, s := range spans {
		if s.end <= s.start {
			continue
		}
		r := kafka.NewReader(kafka.ReaderConfig{Brokers: l.Brokers, Topic: l.Topic, Partition: s.partition,
			MinBytes: 1, MaxBytes: 16 << 20, MaxWait: 200 * time.Millisecond, Dialer: l.Security.ReaderDialer(10 * time.Second)})
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
		next := s.start
		for {
			m, err := r.FetchMessage(ctx)
			if err != nil {
				r.Close()
				return fmt.Errorf("read partition %d: %w", s.partition, err)
			}
			// The topic's offsets run without gaps (it is neither compacted
			// nor written in transactions): a gap is records removed after
			// the read began, which kafka-go's reader steps over silently.
			if m.Offset != next {
				r.Close()
				return errRemoved(s.partition, next, m.Offset-1)
			}
			next++
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

func (l *Log) partitions(ctx context.Context) ([]kafka.Partition, error) {
	if len(l.Brokers) == 0 {
		return nil, errors.New("no kafka brokers")
	}
	conn, err := l.Security.Dialer(10*time.Second).DialContext(ctx, "tcp", l.Brokers[0])
	if err != nil {
		return nil, fmt.Errorf("connect to kafka: %w", err)
	}
	parts, err := conn.ReadPartitions(l.Topic)
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("list partitions of %s: %w", l.Topic, err)
	}
	return parts, nil
}

func (l *Log) spans(ctx context.Context, since time.Time) ([]span, error) {
	parts, err := l.partitions(ctx)
	if err != nil {
		return nil, err
	}
	var out []span
	for _, p := range parts {
		lc, err := l.Security.Dialer(10*time.Second).DialLeader(ctx, "tcp", net.JoinHostPort(p.Leader.Host, strconv.Itoa(p.Leader.Port)), l.Topic, p.ID)
		if err != nil {
			return nil, fmt.Errorf("connect to leader of partition %d: %w", p.ID, err)
		}
		first, last, err := lc.ReadOffsets()
		held := first
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
		out = append(out, span{partition: p.ID, start: first, end: last, first: held})
	}
	return out, nil
}
