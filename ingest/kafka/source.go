// Package kafka reads the usage topic as consumer group members, reports
// the group's offsets and writes rejected records to the dead-letter topic.
package kafka

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/deadline"
)

// Source is one consumer group member with explicit commits.
type Source struct {
	r     *kafka.Reader
	topic string
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
			QueueCapacity:  1000,
			CommitInterval: 0, // commits are synchronous and explicit
			StartOffset:    kafka.FirstOffset,
			// A restarted member rejoins quickly, so a killed ingest
			// process's partitions move on within seconds.
			SessionTimeout:    10 * time.Second,
			RebalanceTimeout:  10 * time.Second,
			HeartbeatInterval: time.Second,
			// kafka-go's reader moves a connection's read deadline for
			// every message of a fetch, to the same instant each time.
			Dialer: &kafka.Dialer{
				Timeout: 10 * time.Second,
				DialFunc: func(ctx context.Context, network, addr string) (net.Conn, error) {
					var d net.Dialer
					c, err := d.DialContext(ctx, network, addr)
					if err != nil {
						return nil, err
					}
					return deadline.Lazy(c), nil
				},
			},
		}),
		topic: topic,
	}
}

// Fetch returns the next message without committing it.
func (s *Source) Fetch(ctx context.Context) (ingest.Message, error) {
	m, err := s.r.FetchMessage(ctx)
	if err != nil {
		return ingest.Message{}, err
	}
	return ingest.Message{Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value, Time: m.Time}, nil
}

// Commit commits the offsets after msgs: for each partition, the one after
// the highest offset among msgs (a commit names a position, not records).
func (s *Source) Commit(ctx context.Context, msgs ...ingest.Message) error {
	var last []kafka.Message
	for _, m := range msgs {
		i := slices.IndexFunc(last, func(k kafka.Message) bool { return k.Partition == m.Partition })
		switch {
		case i < 0:
			last = append(last, kafka.Message{Topic: s.topic, Partition: m.Partition, Offset: m.Offset})
		case m.Offset > last[i].Offset:
			last[i].Offset = m.Offset
		}
	}
	if err := s.r.CommitMessages(ctx, last...); err != nil {
		return fmt.Errorf("commit offsets: %w", err)
	}
	return nil
}

// Close leaves the group.
func (s *Source) Close() error { return s.r.Close() }

// Offsets reads the group's committed offsets and the log end offsets.
type Offsets struct {
	client *kafka.Client
	topic  string
	group  string
}

var _ ingest.Offsets = (*Offsets)(nil)

// NewOffsets reports group's position on topic.
func NewOffsets(brokers []string, topic, group string) *Offsets {
	return &Offsets{client: &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 10 * time.Second}, topic: topic, group: group}
}

// Offsets returns committed and end offsets for every partition.
func (o *Offsets) Offsets(ctx context.Context) (map[int]ingest.PartitionOffsets, error) {
	md, err := o.client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{o.topic}})
	if err != nil {
		return nil, fmt.Errorf("topic metadata: %w", err)
	}
	var parts []int
	for _, t := range md.Topics {
		if t.Name == o.topic {
			if t.Error != nil {
				return nil, fmt.Errorf("topic metadata %s: %w", o.topic, t.Error)
			}
			for _, p := range t.Partitions {
				parts = append(parts, p.ID)
			}
		}
	}
	reqs := make([]kafka.OffsetRequest, len(parts))
	for i, p := range parts {
		reqs[i] = kafka.LastOffsetOf(p)
	}
	ends, err := o.client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{o.topic: reqs}})
	if err != nil {
		return nil, fmt.Errorf("list offsets: %w", err)
	}
	for i, p := range parts {
		reqs[i] = kafka.FirstOffsetOf(p)
	}
	starts, err := o.client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{o.topic: reqs}})
	if err != nil {
		return nil, fmt.Errorf("list log start offsets: %w", err)
	}
	committed, err := o.client.OffsetFetch(ctx, &kafka.OffsetFetchRequest{GroupID: o.group, Topics: map[string][]int{o.topic: parts}})
	if err != nil {
		return nil, fmt.Errorf("fetch committed offsets: %w", err)
	}
	if committed.Error != nil {
		return nil, fmt.Errorf("fetch committed offsets: %w", committed.Error)
	}
	out := make(map[int]ingest.PartitionOffsets, len(parts))
	for _, po := range ends.Topics[o.topic] {
		if po.Error != nil {
			return nil, fmt.Errorf("list offsets of partition %d: %w", po.Partition, po.Error)
		}
		out[po.Partition] = ingest.PartitionOffsets{Committed: -1, End: po.LastOffset}
	}
	for _, po := range starts.Topics[o.topic] {
		if po.Error != nil {
			return nil, fmt.Errorf("list log start offset of partition %d: %w", po.Partition, po.Error)
		}
		if cur, ok := out[po.Partition]; ok {
			cur.Start = po.FirstOffset
			out[po.Partition] = cur
		}
	}
	for _, c := range committed.Topics[o.topic] {
		if c.Error != nil {
			return nil, fmt.Errorf("committed offset of partition %d: %w", c.Partition, c.Error)
		}
		po := out[c.Partition]
		po.Committed = c.CommittedOffset
		out[c.Partition] = po
	}
	return out, nil
}

// Header names on dead letters.
const (
	HeaderReason          = "tollgate.reason"
	HeaderSourceTopic     = "tollgate.source_topic"
	HeaderSourcePartition = "tollgate.source_partition"
	HeaderSourceOffset    = "tollgate.source_offset"
	// HeaderOriginalBytes and HeaderOriginalSHA256 are set only on a dead
	// letter whose record was too large for the dead-letter topic: its
	// value is then empty, and the record's bytes stay in the source
	// topic, at the partition and offset the other headers name.
	HeaderOriginalBytes  = "tollgate.original_bytes"
	HeaderOriginalSHA256 = "tollgate.original_sha256"
)

// DeadLetterMaxBytes is the largest dead letter the topic takes when
// Tollgate creates it (its max.message.bytes): four times Kafka's default,
// so a record as large as a usage topic takes by default fits whole, with
// its reason and origin in headers added.
const DeadLetterMaxBytes = 4 << 20

// DeadLetterTopic is the dead-letter topic as Tollgate creates it.
func DeadLetterTopic(name string, partitions int) kafka.TopicConfig {
	return kafka.TopicConfig{Topic: name, NumPartitions: partitions, ReplicationFactor: -1, // the broker's default.replication.factor
		ConfigEntries: []kafka.ConfigEntry{{ConfigName: "max.message.bytes", ConfigValue: strconv.Itoa(DeadLetterMaxBytes)}}}
}

// DeadLetters writes rejected records, with their reason and origin in
// headers and the original bytes untouched, to the dead-letter topic.
//
// Exactly once per source record: the dead letters of source partition P go
// to dead-letter partition P, in source-offset order, one synchronous write
// at a time (the consumer group gives P to one member). Before writing,
// Reject reads the source offset of the last dead letter in partition P and,
// when that dead letter came from this source topic, skips every record at
// or before it, so a batch redelivered after a crash (or a Reject retried
// after a lost produce reply) does not write its dead letters twice. The
// dead-letter topic therefore needs at least as many partitions as the
// usage topic.
type DeadLetters struct {
	w       *kafka.Writer
	brokers []string
	dlq     string
	topic   string
	mu      sync.Mutex // one Reject at a time per process keeps partition order
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
			BatchSize:    1000,
			BatchBytes:   DeadLetterMaxBytes, // per message; writes are chunked smaller
			// One attempt: kafka-go has no idempotent producer, so its own
			// retry after a lost reply would append the dead letters again.
			// The caller retries the whole Reject instead, which first reads
			// what the lost write did append.
			MaxAttempts: 1,
			Balancer:    kafka.BalancerFunc(bySourcePartition),
		},
		brokers: brokers,
		dlq:     topic,
		topic:   sourceTopic,
	}
}

// bySourcePartition sends a dead letter to the partition its record came from.
func bySourcePartition(m kafka.Message, partitions ...int) int {
	for _, h := range m.Headers {
		if h.Key == HeaderSourcePartition {
			p, _ := strconv.Atoi(string(h.Value))
			for _, have := range partitions {
				if have == p {
					return p
				}
			}
		}
	}
	// Unreachable for records Reject built: it checks the partition exists.
	return partitions[0]
}

// Reject writes the dead letters not written before.
func (d *DeadLetters) Reject(ctx context.Context, rs []ingest.Rejected) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	byPart := map[int][]ingest.Rejected{}
	var order []int
	for _, r := range rs {
		p := r.Message.Partition
		if _, ok := byPart[p]; !ok {
			order = append(order, p)
		}
		byPart[p] = append(byPart[p], r)
	}
	for _, p := range order {
		last, err := d.lastWritten(ctx, p)
		if err != nil {
			return err
		}
		var msgs []kafka.Message
		for _, r := range byPart[p] {
			m := r.Message
			if m.Offset <= last {
				continue
			}
			msgs = append(msgs, kafka.Message{
				Key:   m.Key,
				Value: m.Value,
				Headers: []kafka.Header{
					{Key: HeaderReason, Value: []byte(r.Reason)},
					{Key: HeaderSourceTopic, Value: []byte(d.topic)},
					{Key: HeaderSourcePartition, Value: []byte(strconv.Itoa(m.Partition))},
					{Key: HeaderSourceOffset, Value: []byte(strconv.FormatInt(m.Offset, 10))},
				},
			})
		}
		// kafka-go splits one WriteMessages into produce batches and goes
		// on to the next after one fails, which could leave a gap below the
		// last source offset written, and the skip above would then drop
		// the gap's records for good on the retry. So each write is small
		// enough to be one batch, all or nothing, and the first failure
		// stops the partition's writes.
		for _, chunk := range deadLetterChunks(msgs, d.w.BatchSize, 512<<10) {
			err := d.w.WriteMessages(ctx, chunk...)
			if err != nil && len(chunk) == 1 && tooLarge(err) {
				// A topic made elsewhere, with a smaller limit: the dead
				// letter says where the record is instead of holding it,
				// rather than stop the partition for good.
				err = d.w.WriteMessages(ctx, pointer(chunk[0]))
			}
			if err != nil {
				return fmt.Errorf("write dead letters: %w", err)
			}
		}
	}
	return nil
}

// tooLarge reports whether a write failed because a message is larger than
// the writer or the topic takes.
func tooLarge(err error) bool {
	var mtl kafka.MessageTooLargeError
	if errors.As(err, &mtl) || errors.Is(err, kafka.MessageSizeTooLarge) || errors.Is(err, kafka.RecordListTooLarge) {
		return true
	}
	var we kafka.WriteErrors
	if errors.As(err, &we) {
		for _, e := range we {
			if e != nil && (errors.Is(e, kafka.MessageSizeTooLarge) || errors.Is(e, kafka.RecordListTooLarge)) {
				return true
			}
		}
	}
	return false
}

// pointer is the dead letter of a record too large for the dead-letter
// topic: the same headers, the reason saying so, the record's size and
// SHA-256, no value, and its key only if small.
func pointer(m kafka.Message) kafka.Message {
	sum := sha256.Sum256(m.Value)
	p := kafka.Message{Headers: make([]kafka.Header, 0, len(m.Headers)+2)}
	if len(m.Key) <= 1024 {
		p.Key = m.Key
	}
	for _, h := range m.Headers {
		if h.Key == HeaderReason {
			h.Value = append(h.Value[:len(h.Value):len(h.Value)],
				"; too large for the dead-letter topic: the record stays in the source topic at this partition and offset"...)
		}
		p.Headers = append(p.Headers, h)
	}
	p.Headers = append(p.Headers,
		kafka.Header{Key: HeaderOriginalBytes, Value: []byte(strconv.Itoa(len(m.Value)))},
		kafka.Header{Key: HeaderOriginalSHA256, Value: []byte(hex.EncodeToString(sum[:]))})
	return p
}

// deadLetterChunks splits msgs, in order, into runs of at most n messages
// and about maxBytes (a message larger than that is a run of its own).
func deadLetterChunks(msgs []kafka.Message, n, maxBytes int) [][]kafka.Message {
	var out [][]kafka.Message
	start, size := 0, 0
	for i, m := range msgs {
		sz := len(m.Key) + len(m.Value) + 64
		for _, h := range m.Headers {
			sz += len(h.Key) + len(h.Value) + 8
		}
		if i > start && (i-start >= n || size+sz > maxBytes) {
			out = append(out, msgs[start:i])
			start, size = i, 0
		}
		size += sz
	}
	if start < len(msgs) {
		out = append(out, msgs[start:])
	}
	return out
}

// lastWritten is the source offset of the last dead letter in partition p
// when it came from this source topic, or -1 when there is none or it came
// from another: a dead-letter topic can be shared by an old and a new usage
// topic (ingest.topic changed, dead_letter_topic kept), whose offsets have
// nothing to do with each other. Writing a dead letter again is better than
// losing one. A usage topic deleted and created again under the same name
// restarts its offsets and cannot be told apart from the old one here.
func (d *DeadLetters) lastWritten(ctx context.Context, p int) (int64, error) {
	var conn *kafka.Conn
	var err error
	for _, b := range d.brokers {
		if conn, err = kafka.DialLeader(ctx, "tcp", b, d.dlq, p); err == nil {
			break
		}
	}
	if err != nil {
		return 0, fmt.Errorf("dead-letter topic %s partition %d (it needs at least as many partitions as %s): %w", d.dlq, p, d.topic, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	}
	first, last, err := conn.ReadOffsets()
	if err != nil {
		return 0, fmt.Errorf("dead-letter offsets: %w", err)
	}
	if last <= first {
		return -1, nil
	}
	if _, err := conn.Seek(last-1, kafka.SeekAbsolute); err != nil {
		return 0, fmt.Errorf("seek last dead letter: %w", err)
	}
	batch := conn.ReadBatch(1, DeadLetterMaxBytes+1<<20)
	m, err := batch.ReadMessage()
	cerr := batch.Close()
	if err != nil {
		return 0, fmt.Errorf("read last dead letter: %w", errors.Join(err, cerr))
	}
	if src := header(m, HeaderSourceTopic); src != d.topic {
		return -1, nil
	}
	v := header(m, HeaderSourceOffset)
	if v == "" {
		return 0, fmt.Errorf("last dead letter in partition %d has no %s header", p, HeaderSourceOffset)
	}
	o, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("last dead letter has a bad %s header %q", HeaderSourceOffset, v)
	}
	return o, nil
}

// header is the value of m's header key, or "" when it has none.
func header(m kafka.Message, key string) string {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// Close flushes and closes the writer.
func (d *DeadLetters) Close() error { return d.w.Close() }
