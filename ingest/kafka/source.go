// Package kafka reads the usage topic as consumer group members, reports
// the group's offsets and writes rejected records to the dead-letter topic.
package kafka

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Source is one consumer group member with explicit commits.
type Source struct {
	r      *kafka.Reader
	topic  string
	group  string
	client *kafka.Client

	// commitMu orders this member's commits, its re-commits among them.
	commitMu sync.Mutex
	// landed is, per partition, the offset after the last record this
	// member committed as landed, and when: what it may commit again.
	landed map[int]landedAt
	// recommitEvery is how often landed offsets the group's stored ones
	// fell below are committed again.
	recommitEvery time.Duration
	// recommitPaused stops re-commits after one whose wait ran out, until
	// a later commit of this member (its own, or an empty one a paused
	// tick sends) has been answered: kafka-go keeps a commit whose wait
	// ran out queued, and sends it when the group has a generation again,
	// unchecked; one queued per tick through a rebalance or an outage
	// could move offsets back then.
	recommitPaused bool
	startOnce      sync.Once
	stop           context.CancelFunc
	stopped        chan struct{}
}

// landedAt is the position after a member's last landed record in a
// partition, that record's time (which tells its log from a log made again
// under the topic's name), and when the member committed it.
type landedAt struct {
	next   int64
	record time.Time
	at     time.Time
}

// recommitInterval is how often a member commits again the offsets it
// landed that the group's stored ones fell below; recommitWindow is for
// how long after its last commit in a partition it does. The race it
// repairs comes with a rebalance, within seconds of the commits that
// raced; past the window the partition's position is left to whoever
// commits there next, so a member never moves forward a group offset an
// operator set on purpose, or one of a topic made again under the same
// name, long after its own commits.
const (
	recommitInterval = 5 * time.Second
	recommitWindow   = time.Minute
)

var _ ingest.Source = (*Source)(nil)

// NewSource joins group on topic, reaching brokers as sec says.
func NewSource(brokers []string, sec kafkaconn.Security, topic, group string) *Source {
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
			// Partitions added to the usage topic while ingest runs are
			// read within seconds: without the watch the group took them
			// only at its next rebalance for another reason, and their
			// usage (and every watermark with them) waited until then.
			WatchPartitionChanges:  true,
			PartitionWatchInterval: 5 * time.Second,
			Dialer:                 sec.ReaderDialer(10 * time.Second),
		}),
		topic:         topic,
		group:         group,
		client:        &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 10 * time.Second, Transport: sec.Transport()},
		landed:        map[int]landedAt{},
		recommitEvery: recommitInterval,
		stopped:       make(chan struct{}),
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
			last = append(last, kafka.Message{Topic: s.topic, Partition: m.Partition, Offset: m.Offset, Time: m.Time})
		case m.Offset > last[i].Offset:
			last[i].Offset, last[i].Time = m.Offset, m.Time
		}
	}
	s.startOnce.Do(s.startRecommits)
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	// A member commits a partition's batches in order, so its latest
	// commit there is what it has landed. One below the position before
	// (its reading of the partition started again lower: a new
	// assignment, or a topic made again) replaces it too.
	now := time.Now()
	for _, m := range last {
		s.landed[m.Partition] = landedAt{next: m.Offset + 1, record: m.Time, at: now}
	}
	sent, err := s.commitAbove(ctx, last)
	if err != nil {
		return err
	}
	if sent {
		// Commits go out in order: one queued by a re-commit whose wait
		// ran out has gone before this one.
		s.recommitPaused = false
	}
	return nil
}

// commitAbove commits msgs' positions, each only above the group's stored
// one. The broker takes a commit from any member of the group, whoever
// owns the partition now: a member that lost a partition in a rebalance
// while its batch landed would move the group's offset back below what
// the partition's new owner committed (its lag, and its watermark, then
// stuck there on an idle partition). A commit below the stored one is
// dropped; the batch has landed either way. Reading and committing are
// two requests, so two members can still race between them, and the
// re-commits (startRecommits) repair what that moves back.
func (s *Source) commitAbove(ctx context.Context, last []kafka.Message) (sent bool, err error) {
	stored, err := s.committed(ctx, last)
	if err != nil {
		return false, err
	}
	last = slices.DeleteFunc(last, func(m kafka.Message) bool { return stored[m.Partition] >= m.Offset+1 })
	if len(last) == 0 {
		return false, nil
	}
	if err := s.r.CommitMessages(ctx, last...); err != nil {
		return false, fmt.Errorf("commit offsets: %w", err)
	}
	return true, nil
}

// startRecommits commits again, every recommitEvery until Close, each
// position this member landed that the group's stored offset has fallen
// below. Every record before such a position has landed, so committing it
// is safe whoever owns the partition now; and an offset that two members'
// commits raced back below it would otherwise stay there on a partition
// that gets no new record, with its lag above 0 and its watermark (and so
// every period's close) waiting for one.
func (s *Source) startRecommits() {
	ctx, stop := context.WithCancel(context.Background())
	s.stop = stop
	go func() {
		defer close(s.stopped)
		t := time.NewTicker(s.recommitEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			// A failure (Kafka away, a rebalance under way) is tried
			// again at the next tick; the worker's own commits report
			// such failures.
			_ = s.recommit(ctx)
		}
	}()
}

// recommit commits again each landed position the stored offset is below.
// A partition with no stored offset at all, or whose log now ends before
// the position, is let go instead: two members' racing commits leave
// neither; a topic deleted (and perhaps made again under its name) or the
// group's offsets expired do, and the position is not that topic's.
func (s *Source) recommit(ctx context.Context) error {
	s.commitMu.Lock()
	paused := s.recommitPaused
	s.commitMu.Unlock()
	if paused {
		// kafka-go answers commits in order: once an empty one is
		// answered, the one whose wait ran out has gone out or been
		// dropped. Waited for without the lock, so the worker's own
		// commits do not wait behind it; only this goroutine pauses.
		bctx, cancel := context.WithTimeout(ctx, s.recommitEvery)
		err := s.r.CommitMessages(bctx)
		cancel()
		if mayStillBeQueued(err) || ctx.Err() != nil {
			return nil
		}
		s.commitMu.Lock()
		s.recommitPaused = false
		s.commitMu.Unlock()
	}
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	var last []kafka.Message
	now := time.Now()
	for p, l := range s.landed {
		if now.Sub(l.at) > recommitWindow {
			delete(s.landed, p)
			continue
		}
		last = append(last, kafka.Message{Topic: s.topic, Partition: p, Offset: l.next - 1})
	}
	if len(last) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.recommitEvery)
	defer cancel()
	return s.recommitBelow(ctx, last)
}

// recommitBelow commits the positions of last whose stored offset is
// below them, letting go of those recommit lets go of.
func (s *Source) recommitBelow(ctx context.Context, last []kafka.Message) error {
	stored, err := s.committed(ctx, last)
	if err != nil {
		return err
	}
	last = slices.DeleteFunc(last, func(m kafka.Message) bool {
		switch st := stored[m.Partition]; {
		case st < 0:
			delete(s.landed, m.Partition)
			return true
		case st >= m.Offset+1:
			return true
		}
		return false
	})
	if len(last) == 0 {
		return nil
	}
	reqs := make([]kafka.OffsetRequest, 0, 2*len(last))
	for _, m := range last {
		reqs = append(reqs, kafka.FirstOffsetOf(m.Partition), kafka.LastOffsetOf(m.Partition))
	}
	res, err := s.client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{s.topic: reqs}})
	if err != nil {
		return fmt.Errorf("list offsets: %w", err)
	}
	bounds := map[int]kafka.PartitionOffsets{}
	for _, po := range res.Topics[s.topic] {
		bounds[po.Partition] = po
	}
	var keep []kafka.Message
	for _, m := range last {
		// A partition that cannot be read now (its leader moving) waits
		// for the next tick; the others go on.
		b, ok := bounds[m.Partition]
		switch {
		case !ok || b.Error != nil:
			continue
		case b.LastOffset < m.Offset+1:
			delete(s.landed, m.Partition)
			continue
		case b.FirstOffset >= m.Offset+1:
			// Every record before the position is gone from the log (by
			// retention). Nothing is left to read below it, and the
			// watermark measures from the log's start, so the partition is
			// caught up without a commit; one would hide, were this a topic
			// made again, that records of it were deleted unread, which
			// the watermark reports.
			delete(s.landed, m.Partition)
			continue
		}
		// The log may have grown past the position in a topic made again,
		// and another member may have committed there: the record at the
		// position must be the one landed.
		same, err := s.sameRecord(ctx, m.Partition, m.Offset, s.landed[m.Partition].record)
		switch {
		case err != nil:
			continue
		case !same:
			delete(s.landed, m.Partition)
			continue
		}
		keep = append(keep, m)
	}
	if len(keep) == 0 {
		return nil
	}
	if err := s.r.CommitMessages(ctx, keep...); err != nil {
		// A commit whose wait ran out may still be queued in kafka-go: no
		// more re-commits until one of this member's own has gone out
		// after it. Any other failure is kafka-go's answer to the commit,
		// which it has done with.
		if mayStillBeQueued(err) {
			s.recommitPaused = true
		}
		return fmt.Errorf("commit offsets: %w", err)
	}
	return nil
}

// mayStillBeQueued reports whether a commit that failed with err may still
// be sent by kafka-go's reader: one whose wait ran out (ctx's deadline) may
// sit in its queue, or be on its way; any other failure is the reader's
// answer to the commit, which it has done with. (A cancelled ctx is Close,
// after which nothing is re-committed.)
func mayStillBeQueued(err error) bool {
	return errors.Is(err, context.DeadlineExceeded)
}

// sameRecord reports whether partition p's record at offset is the one of
// time at that this member landed there.
func (s *Source) sameRecord(ctx context.Context, p int, offset int64, at time.Time) (bool, error) {
	// One byte asks for the least the broker sends: the first record
	// batch at the offset, whole.
	res, err := s.client.Fetch(ctx, &kafka.FetchRequest{Topic: s.topic, Partition: p, Offset: offset,
		MinBytes: 1, MaxBytes: 1, MaxWait: 100 * time.Millisecond})
	if err != nil {
		return false, fmt.Errorf("read partition %d at %d: %w", p, offset, err)
	}
	if res.Error != nil {
		// Out of range too: the offsets were read just before, so
		// retention has just deleted the record, and the next tick sees
		// that.
		return false, fmt.Errorf("read partition %d at %d: %w", p, offset, res.Error)
	}
	for {
		// A fetch answers with whole record batches, which may start
		// before the offset asked for.
		r, err := res.Records.ReadRecord()
		if err != nil {
			return false, nil // not there: the log is not the one landed
		}
		if r.Offset >= offset {
			return r.Offset == offset && recordMillis(r.Time) == recordMillis(at), nil
		}
	}
}

// recordMillis is a record's timestamp as Kafka keeps it, in milliseconds,
// with 0 for none: kafka-go's reader gives a record without a timestamp
// (0 or below) the zero time, and its fetch the Unix time it holds.
func recordMillis(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return max(t.UnixMilli(), 0)
}

// committed is the group's stored offset of each of msgs' partitions (-1:
// none).
func (s *Source) committed(ctx context.Context, msgs []kafka.Message) (map[int]int64, error) {
	parts := make([]int, len(msgs))
	for i, m := range msgs {
		parts[i] = m.Partition
	}
	res, err := s.client.OffsetFetch(ctx, &kafka.OffsetFetchRequest{GroupID: s.group, Topics: map[string][]int{s.topic: parts}})
	if err == nil {
		err = res.Error
	}
	if err != nil {
		return nil, fmt.Errorf("read committed offsets: %w", err)
	}
	out := map[int]int64{}
	for _, p := range res.Topics[s.topic] {
		if p.Error != nil {
			return nil, fmt.Errorf("read committed offset of partition %d: %w", p.Partition, p.Error)
		}
		out[p.Partition] = p.CommittedOffset
	}
	return out, nil
}

// Close leaves the group.
func (s *Source) Close() error {
	s.startOnce.Do(func() { close(s.stopped) }) // never started
	if s.stop != nil {
		s.stop()
	}
	<-s.stopped
	if t, ok := s.client.Transport.(*kafka.Transport); ok {
		t.CloseIdleConnections()
	}
	return s.r.Close()
}

// Offsets reads the group's committed offsets and the log end offsets.
type Offsets struct {
	client *kafka.Client
	topic  string
	group  string
}

var _ ingest.Offsets = (*Offsets)(nil)

// NewOffsets reports group's position on topic, reaching brokers as sec
// says.
func NewOffsets(brokers []string, sec kafkaconn.Security, topic, group string) *Offsets {
	return &Offsets{client: &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 10 * time.Second, Transport: sec.Transport()}, topic: topic, group: group}
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
// when that dead letter came from this source topic's partition P, skips
// every record at or before it, so a batch redelivered after a crash (or a
// Reject retried after a lost produce reply) does not write its dead letters
// twice. The dead-letter topic therefore needs at least as many partitions
// as the usage topic: Reject adds the ones it lacks (the usage topic may
// gain partitions while ingest runs).
type DeadLetters struct {
	client  *kafka.Client
	dialer  *kafka.Dialer
	brokers []string
	dlq     string
	topic   string
	mu      sync.Mutex // one Reject at a time per process keeps partition order
}

var _ ingest.DeadLetters = (*DeadLetters)(nil)

// deadLetterBatch bounds the dead letters of one produce request.
const deadLetterBatch = 1000

// lookupTimeout bounds finding a dead-letter partition's leader: kafka-go
// looks for a partition the topic lacks for ever.
const lookupTimeout = 15 * time.Second

// NewDeadLetters writes to topic on brokers, reaching them as sec says.
func NewDeadLetters(brokers []string, sec kafkaconn.Security, topic, sourceTopic string) *DeadLetters {
	return &DeadLetters{
		// Produce requests name their partition, so a dead letter goes to
		// its source partition however old the client's view of the topic
		// (a writer's balancer, given a cached list without a partition
		// added since, sent it to partition 0). One attempt each: kafka-go
		// has no idempotent producer, so a retry of its own after a lost
		// reply would append the dead letters again; the caller retries
		// the whole Reject instead, which first reads what the lost write
		// did append.
		client:  &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 30 * time.Second, Transport: sec.Transport()},
		dialer:  sec.Dialer(10 * time.Second),
		brokers: brokers,
		dlq:     topic,
		topic:   sourceTopic,
	}
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
		// A member that gets its partition back in a rebalance reads it
		// again from the committed offset, into the batch it was filling:
		// each record is dead-lettered once, in offset order.
		recs := byPart[p]
		slices.SortStableFunc(recs, func(a, b ingest.Rejected) int { return cmp.Compare(a.Message.Offset, b.Message.Offset) })
		byPart[p] = slices.CompactFunc(recs, func(a, b ingest.Rejected) bool { return a.Message.Offset == b.Message.Offset })
		if err := d.rejectPartition(ctx, p, byPart[p]); err != nil {
			return err
		}
	}
	return nil
}

// rejectPartition writes partition p's dead letters not written before.
// A write the broker refused before appending (a new partition with no
// leader yet) is tried again from the start: what was written is read
// again first, since the same refusal can also come after an append (a
// leader that lost its place while waiting for its replicas).
func (d *DeadLetters) rejectPartition(ctx context.Context, p int, recs []ingest.Rejected) error {
	for attempt := 1; ; attempt++ {
		err := d.writePartition(ctx, p, recs)
		if err == nil || attempt == refusedAttempts || !refusedUnwritten(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
		}
	}
}

// writePartition writes recs, partition p's, after the last one written.
func (d *DeadLetters) writePartition(ctx context.Context, p int, recs []ingest.Rejected) error {
	last, err := d.lastWritten(ctx, p)
	if err != nil {
		return err
	}
	var msgs []kafka.Message
	for _, r := range recs {
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
	for _, chunk := range deadLetterChunks(msgs, deadLetterBatch, 512<<10) {
		err := d.produce(ctx, p, chunk)
		if err != nil && len(chunk) > 1 && tooLarge(err) {
			// A topic made elsewhere, with a limit below the chunk's
			// size (the limit is on the whole batch): one at a time, in
			// order, so what is written is still a prefix.
			for _, m := range chunk {
				if err = d.produceOne(ctx, p, m); err != nil {
					break
				}
			}
		} else if err != nil && tooLarge(err) {
			err = d.produce(ctx, p, []kafka.Message{pointer(chunk[0])})
		}
		if err != nil {
			return fmt.Errorf("write dead letters: %w", err)
		}
	}
	return nil
}

// produceOne writes the dead letter m alone, or, when it is too large for
// the topic (one made elsewhere, with a smaller limit), a dead letter that
// says where the record is instead of holding it, rather than stop the
// partition for good.
func (d *DeadLetters) produceOne(ctx context.Context, p int, m kafka.Message) error {
	err := d.produce(ctx, p, []kafka.Message{m})
	if err != nil && tooLarge(err) {
		err = d.produce(ctx, p, []kafka.Message{pointer(m)})
	}
	return err
}

// produce appends msgs to partition p of the dead-letter topic, all or
// nothing: one produce request, acknowledged by every in-sync replica.
func (d *DeadLetters) produce(ctx context.Context, p int, msgs []kafka.Message) error {
	recs := make([]kafka.Record, len(msgs))
	for i, m := range msgs {
		recs[i] = kafka.Record{Time: time.Now(), Headers: m.Headers, Value: kafka.NewBytes(m.Value)}
		if m.Key != nil {
			recs[i].Key = kafka.NewBytes(m.Key)
		}
	}
	res, err := d.client.Produce(ctx, &kafka.ProduceRequest{Topic: d.dlq, Partition: p, RequiredAcks: kafka.RequireAll,
		Records: kafka.NewRecordReader(recs...)})
	if err == nil {
		err = res.Error
	}
	if err != nil {
		return err
	}
	for _, e := range res.RecordErrors {
		if e != nil {
			return e
		}
	}
	return nil
}

// refusedAttempts bounds the tries of a partition's dead letters when the
// broker refuses them for want of a leader.
const refusedAttempts = 5

// refusedUnwritten reports whether a produce failed for want of a leader
// or of replicas, which passes.
func refusedUnwritten(err error) bool {
	return errors.Is(err, kafka.NotLeaderForPartition) || errors.Is(err, kafka.LeaderNotAvailable) ||
		errors.Is(err, kafka.UnknownTopicOrPartition) || errors.Is(err, kafka.NotEnoughReplicas)
}

// ensurePartition adds partitions to the dead-letter topic until it has
// partition p, as the usage topic has: one added there while ingest runs is
// read at once, and its dead letters must have somewhere to go. A
// dead-letter topic deleted while ingest runs is made again, as `tollgate
// ingest` makes it at start: otherwise every Reject failed, and the worker
// that met a malformed record held its batch, valid events and all, and
// read no more until the topic was made by hand or ingest restarted. The
// dead letters written before the deletion went with the topic.
func (d *DeadLetters) ensurePartition(ctx context.Context, p int) error {
	have := func() (int, error) {
		md, err := d.client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{d.dlq}})
		if err != nil {
			return 0, err
		}
		for _, t := range md.Topics {
			if t.Name == d.dlq {
				if t.Error != nil {
					return 0, t.Error
				}
				return len(t.Partitions), nil
			}
		}
		return 0, fmt.Errorf("no metadata for topic %s", d.dlq)
	}
	n, err := have()
	if errors.Is(err, kafka.UnknownTopicOrPartition) {
		res, cerr := d.client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{DeadLetterTopic(d.dlq, p+1)}})
		if cerr == nil {
			cerr = res.Errors[d.dlq]
		}
		// Another member may have made it meanwhile.
		if cerr != nil && !errors.Is(cerr, kafka.TopicAlreadyExists) {
			return fmt.Errorf("make the dead-letter topic %s again (it was deleted): %w", d.dlq, cerr)
		}
		n, err = have()
		for errors.Is(err, kafka.UnknownTopicOrPartition) {
			select {
			case <-ctx.Done():
				return fmt.Errorf("dead-letter topic %s: %w", d.dlq, ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
			n, err = have()
		}
	}
	if err != nil || n > p {
		return err
	}
	res, err := d.client.CreatePartitions(ctx, &kafka.CreatePartitionsRequest{
		Topics: []kafka.TopicPartitionsConfig{{Name: d.dlq, Count: int32(p + 1)}}})
	if err == nil {
		err = res.Errors[d.dlq]
	}
	// Another member may have grown it meanwhile.
	if err != nil && !errors.Is(err, kafka.InvalidPartitionNumber) {
		return fmt.Errorf("add partitions to the dead-letter topic %s (it needs at least as many as %s): %w", d.dlq, d.topic, err)
	}
	for {
		if n, err = have(); err != nil || n > p {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("dead-letter topic %s partition %d: %w", d.dlq, p, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
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
			h.Value = []byte(schemas.Clip(string(h.Value), ingest.MaxReasonBytes) +
				"; too large for the dead-letter topic: the record stays in the source topic at this partition and offset")
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
	lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	if err := d.ensurePartition(lctx, p); err != nil {
		return 0, err
	}
	var conn *kafka.Conn
	var err error
	for _, b := range d.brokers {
		if conn, err = d.dialer.DialLeader(lctx, "tcp", b, d.dlq, p); err == nil {
			break
		}
	}
	if err != nil {
		return 0, fmt.Errorf("dead-letter topic %s partition %d: %w", d.dlq, p, err)
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
	// Only a dead letter of this topic's partition p counts: one of
	// another partition (misrouted by an older release) says nothing about
	// which of p's records were written.
	if header(m, HeaderSourceTopic) != d.topic || header(m, HeaderSourcePartition) != strconv.Itoa(p) {
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

// Close releases the client's idle connections.
func (d *DeadLetters) Close() error {
	if t, ok := d.client.Transport.(*kafka.Transport); ok {
		t.CloseIdleConnections()
	}
	return nil
}
