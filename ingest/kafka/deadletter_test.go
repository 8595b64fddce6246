package kafka

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/protocol"
	"github.com/segmentio/kafka-go/protocol/produce"

	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// produceLarge writes value to partition 0 of topic, as an edge or a client
// could, and returns its offset: proof that the usage topic took it.
func produceLarge(t *testing.T, topic string, key, value []byte) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll,
		BatchBytes: 4 << 20, BatchTimeout: time.Millisecond}
	defer w.Close()
	testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Key: key, Value: value}), "write the large record to the usage topic")
	conn, err := kafka.DialLeader(ctx, "tcp", testenv.KafkaBrokers()[0], topic, 0)
	testenv.Must(t, err, "dial the usage topic")
	defer conn.Close()
	_, last, err := conn.ReadOffsets()
	testenv.Must(t, err, "usage topic offsets")
	return last - 1
}

// createDeadLetterTopic creates the topic cfg describes, deleted when the
// test ends.
func createDeadLetterTopic(t *testing.T, cfg kafka.TopicConfig) {
	t.Helper()
	client := &kafka.Client{Addr: kafka.TCP(testenv.KafkaBrokers()...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{cfg}})
	if err != nil {
		testenv.Unreachable(t, "Kafka", strings.Join(testenv.KafkaBrokers(), ","), err)
	}
	testenv.Must(t, res.Errors[cfg.Topic], "create the dead-letter topic")
	t.Cleanup(func() {
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{cfg.Topic}})
	})
}

// readDeadLetters reads every message in partition 0 of topic.
func readDeadLetters(t *testing.T, topic string) []kafka.Message {
	t.Helper()
	return readPartition(t, topic, 0)
}

// readPartition reads every message in partition p of topic.
func readPartition(t *testing.T, topic string, p int) []kafka.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := kafka.DialLeader(ctx, "tcp", testenv.KafkaBrokers()[0], topic, p)
	testenv.Must(t, err, "dial the dead-letter topic")
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	first, last, err := conn.ReadOffsets()
	testenv.Must(t, err, "dead-letter offsets")
	var out []kafka.Message
	for o := first; o < last; o = first + int64(len(out)) {
		_, err := conn.Seek(o, kafka.SeekAbsolute)
		testenv.Must(t, err, "seek")
		batch := conn.ReadBatch(1, 8<<20)
		for {
			m, err := batch.ReadMessage()
			if err != nil {
				break
			}
			out = append(out, m)
		}
		testenv.Must(t, batch.Close(), "read dead letters")
	}
	return out
}

// A malformed record as large as the usage topic takes by default (1 MiB)
// still fits in the dead-letter topic as Tollgate creates it, with its
// headers. Before, the writer refused it and its worker retried for ever,
// holding the partition.
func TestARecordAsLargeAsTheUsageTopicTakesIsDeadLetteredWhole(t *testing.T) {
	src := testenv.NewTopic(t, 1)
	dlq := src + ".dlq"
	createDeadLetterTopic(t, DeadLetterTopic(dlq, 1))

	big := bytes.Repeat([]byte("x"), 1_048_450) // about the most a 1 MiB topic takes in one record
	off := produceLarge(t, src, []byte("acct_big"), big)
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, src)
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.Must(t, d.Reject(ctx, []ingest.Rejected{
		{Message: ingest.Message{Partition: 0, Offset: off, Key: []byte("acct_big"), Value: big}, Reason: "not JSON"},
		{Message: ingest.Message{Partition: 0, Offset: off + 1, Value: []byte("{")}, Reason: "truncated JSON"},
	}), "dead-letter a 1 MiB record")

	got := readDeadLetters(t, dlq)
	if len(got) != 2 {
		t.Fatalf("%d dead letters, want 2", len(got))
	}
	if !bytes.Equal(got[0].Value, big) || string(got[0].Key) != "acct_big" || header(got[0], HeaderReason) != "not JSON" ||
		header(got[0], HeaderSourceOffset) != strconv.FormatInt(off, 10) || header(got[0], HeaderOriginalBytes) != "" {
		t.Fatalf("first dead letter: %d bytes (want %d), key %q, headers %v", len(got[0].Value), len(big), got[0].Key, got[0].Headers)
	}
	if string(got[1].Value) != "{" || header(got[1], HeaderSourceOffset) != strconv.FormatInt(off+1, 10) {
		t.Fatalf("second dead letter %q, headers %v", got[1].Value, got[1].Headers)
	}
}

// A dead-letter topic made elsewhere with Kafka's default limit cannot hold
// that record with its headers. Its dead letter then says where the record
// is (its size and SHA-256; the bytes stay in the usage topic), the records
// behind it are dead-lettered as usual, and a redelivery writes nothing twice.
func TestADeadLetterTopicTooSmallForARecordGetsWhereItIsAndThePartitionMovesOn(t *testing.T) {
	src := testenv.NewTopic(t, 1)
	dlq := src + ".dlq"
	testenv.CreateTopic(t, dlq, 1) // the broker's default max.message.bytes, 1 MiB

	big := bytes.Repeat([]byte("x"), 1_048_450) // about the most a 1 MiB topic takes in one record
	off := produceLarge(t, src, []byte("acct_big"), big)
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, src)
	defer d.Close()
	batch := []ingest.Rejected{
		{Message: ingest.Message{Partition: 0, Offset: off, Key: []byte("acct_big"), Value: big}, Reason: "not JSON"},
		{Message: ingest.Message{Partition: 0, Offset: off + 1, Value: []byte("{")}, Reason: "truncated JSON"},
	}
	for round := range 2 { // the second is a redelivery after a crash before the commit
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := d.Reject(ctx, batch)
		cancel()
		testenv.Must(t, err, "dead-letter round "+strconv.Itoa(round))
	}

	got := readDeadLetters(t, dlq)
	if len(got) != 2 {
		t.Fatalf("%d dead letters, want 2", len(got))
	}
	sum := sha256.Sum256(big)
	if len(got[0].Value) != 0 || string(got[0].Key) != "acct_big" ||
		header(got[0], HeaderOriginalBytes) != strconv.Itoa(len(big)) || header(got[0], HeaderOriginalSHA256) != hex.EncodeToString(sum[:]) ||
		header(got[0], HeaderSourceTopic) != src || header(got[0], HeaderSourcePartition) != "0" || header(got[0], HeaderSourceOffset) != strconv.FormatInt(off, 10) ||
		!strings.HasPrefix(header(got[0], HeaderReason), "not JSON; too large for the dead-letter topic") {
		t.Fatalf("first dead letter: %d bytes, key %q, headers %v", len(got[0].Value), got[0].Key, got[0].Headers)
	}
	if string(got[1].Value) != "{" || header(got[1], HeaderSourceOffset) != strconv.FormatInt(off+1, 10) {
		t.Fatalf("second dead letter %q, headers %v", got[1].Value, got[1].Headers)
	}
}

// lostReply forwards every request to the broker, but answers the first
// produce with a broken connection, as when the broker appended the batch
// and its reply never arrived.
type lostReply struct {
	kafka.RoundTripper
	lost atomic.Bool
}

func (l *lostReply) RoundTrip(ctx context.Context, addr net.Addr, req protocol.Message) (protocol.Message, error) {
	res, err := l.RoundTripper.RoundTrip(ctx, addr, req)
	if _, ok := req.(*produce.Request); ok && err == nil && l.lost.CompareAndSwap(false, true) {
		return nil, io.ErrUnexpectedEOF
	}
	return res, err
}

// A produce whose reply is lost fails the Reject, and ingest retries the
// Reject, which skips what the lost write appended. Before, the writer
// retried the produce itself (kafka-go has no idempotent producer), and the
// broker appended the dead letters a second time.
func TestALostProduceReplyWritesEachDeadLetterOnce(t *testing.T) {
	src := testenv.NewTopic(t, 1)
	dlq := src + ".dlq"
	testenv.CreateTopic(t, dlq, 1)
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, src)
	defer d.Close()
	d.client.Transport = &lostReply{RoundTripper: kafka.DefaultTransport}
	batch := []ingest.Rejected{
		{Message: ingest.Message{Partition: 0, Offset: 7, Value: []byte("{")}, Reason: "truncated JSON"},
		{Message: ingest.Message{Partition: 0, Offset: 8, Value: []byte("[")}, Reason: "truncated JSON"},
	}
	var err error
	for range 5 { // as ingest retries a failed step
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = d.Reject(ctx, batch)
		cancel()
		if err == nil {
			break
		}
	}
	testenv.Must(t, err, "dead-letter the batch")
	var offsets []string
	for _, m := range readDeadLetters(t, dlq) {
		offsets = append(offsets, header(m, HeaderSourceOffset))
	}
	if strings.Join(offsets, ",") != "7,8" {
		t.Fatalf("dead letters of source offsets %v, want each of 7 and 8 once", offsets)
	}
}

// A dead-letter topic shared by two usage topics (ingest.topic changed and
// dead_letter_topic kept) holds dead letters of the old topic at offsets
// the new one has not reached. The new topic's malformed records are still
// written: before, the last dead letter's offset was compared whatever its
// topic, and every record of the new topic at or below it was skipped.
func TestDeadLettersOfAnotherTopicDoNotSkipThisOnes(t *testing.T) {
	oldSrc := testenv.NewTopic(t, 1)
	newSrc := testenv.NewTopic(t, 1)
	dlq := oldSrc + ".dlq"
	testenv.CreateTopic(t, dlq, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	old := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, oldSrc)
	testenv.Must(t, old.Reject(ctx, []ingest.Rejected{{Message: ingest.Message{Partition: 0, Offset: 500, Value: []byte("{")}, Reason: "old"}}), "old topic's dead letter")
	testenv.Must(t, old.Close(), "close")
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, newSrc)
	defer d.Close()
	batch := []ingest.Rejected{{Message: ingest.Message{Partition: 0, Offset: 3, Value: []byte("[")}, Reason: "new"}}
	for range 2 { // the second is a redelivery: skipped, as the dead letter is this topic's now
		testenv.Must(t, d.Reject(ctx, batch), "new topic's dead letter")
	}
	var got []string
	for _, m := range readDeadLetters(t, dlq) {
		got = append(got, header(m, HeaderSourceTopic)+"@"+header(m, HeaderSourceOffset))
	}
	if want := []string{oldSrc + "@500", newSrc + "@3"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("dead letters %v, want %v", got, want)
	}
}

// deadLetterOrigins are the source partition and offset of each dead
// letter in partition p of topic.
func deadLetterOrigins(t *testing.T, topic string, p int) string {
	t.Helper()
	var got []string
	for _, m := range readPartition(t, topic, p) {
		got = append(got, header(m, HeaderSourcePartition)+"@"+header(m, HeaderSourceOffset))
	}
	return strings.Join(got, " ")
}

// A usage partition the dead-letter topic lacks (the usage topic gained
// one while ingest ran) gets its dead-letter partition added, and each
// partition's dead letters go to their own partition. Before, Reject waited
// for the missing partition for ever, without a word; once an operator
// added it, the writer's cached view sent the dead letter to partition 0,
// where it made partition 0's next malformed records look written already,
// and they were lost.
func TestDeadLettersOfANewPartitionGoToTheirOwn(t *testing.T) {
	ctx, d := newDeadLetters(t, 2, 1)
	testenv.Must(t, d.Reject(ctx, rejected(0, 0)), "partition 0's first dead letter")
	testenv.Must(t, d.Reject(ctx, rejected(1, 50)), "partition 1's dead letter, its dead-letter partition missing")
	testenv.Must(t, d.Reject(ctx, rejected(0, 1, 2, 3, 4, 5)), "partition 0's next dead letters")
	if got, want := deadLetterOrigins(t, d.dlq, 0), "0@0 0@1 0@2 0@3 0@4 0@5"; got != want {
		t.Errorf("dead-letter partition 0 holds %s, want %s", got, want)
	}
	if got, want := deadLetterOrigins(t, d.dlq, 1), "1@50"; got != want {
		t.Errorf("dead-letter partition 1 holds %s, want %s", got, want)
	}
}

// A dead letter of another source partition at the end of partition p (one
// an older release misrouted) does not make p's records look written.
func TestAMisroutedDeadLetterSkipsNothing(t *testing.T) {
	ctx, d := newDeadLetters(t, 2, 2)
	misrouted := kafka.Message{Value: []byte("["), Headers: []kafka.Header{
		{Key: HeaderReason, Value: []byte("old")}, {Key: HeaderSourceTopic, Value: []byte(d.topic)},
		{Key: HeaderSourcePartition, Value: []byte("1")}, {Key: HeaderSourceOffset, Value: []byte("50")}}}
	var err error
	for range 20 { // the topic is new: its partition may have no leader yet
		if err = d.produce(ctx, 0, []kafka.Message{misrouted}); err == nil || !refusedUnwritten(err) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	testenv.Must(t, err, "write a misrouted dead letter")
	testenv.Must(t, d.Reject(ctx, rejected(0, 7)),
		"partition 0's dead letter")
	if got, want := deadLetterOrigins(t, d.dlq, 0), "1@50 0@7"; got != want {
		t.Errorf("dead-letter partition 0 holds %s, want %s", got, want)
	}
}

// A batch holding a partition's records twice (a member given its partition
// back in a rebalance reads it again from the committed offset, into the
// same batch) dead-letters each once, in offset order.
func TestARecordReadTwiceInOneBatchIsDeadLetteredOnce(t *testing.T) {
	ctx, d := newDeadLetters(t, 1, 1)
	testenv.Must(t, d.Reject(ctx, rejected(0, 3, 7, 3, 7)), "dead-letter the batch")
	if got, want := deadLetterOrigins(t, d.dlq, 0), "0@3 0@7"; got != want {
		t.Errorf("dead letters %s, want %s", got, want)
	}
}

// A partition added to the usage topic while a member reads it is read
// within seconds. Before, the group took it only at its next rebalance for
// another reason, so its events did not land until then.
func TestAPartitionAddedWhileReadingIsRead(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll,
		BatchTimeout: time.Millisecond, Balancer: kafka.BalancerFunc(func(m kafka.Message, ps ...int) int { return ps[len(ps)-1] })}
	defer w.Close()
	testenv.Must(t, w.WriteMessages(ctx, kafka.Message{Value: []byte("first")}), "write to partition 0")
	src := NewSource(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group")
	defer src.Close()
	m, err := src.Fetch(ctx)
	testenv.Must(t, err, "read partition 0")
	testenv.Must(t, src.Commit(ctx, m), "commit")
	client := &kafka.Client{Addr: kafka.TCP(testenv.KafkaBrokers()...), Timeout: 20 * time.Second}
	res, err := client.CreatePartitions(ctx, &kafka.CreatePartitionsRequest{Topics: []kafka.TopicPartitionsConfig{{Name: topic, Count: 2}}})
	if err == nil {
		err = res.Errors[topic]
	}
	testenv.Must(t, err, "add partition 1")
	// The writer's view of the topic catches up within its metadata TTL.
	testenv.Wait(t, 30*time.Second, "a record in partition 1", func() bool {
		if err := w.WriteMessages(ctx, kafka.Message{Value: []byte("second")}); err != nil {
			return false
		}
		conn, err := kafka.DialLeader(ctx, "tcp", testenv.KafkaBrokers()[0], topic, 1)
		if err != nil {
			return false
		}
		defer conn.Close()
		_, last, err := conn.ReadOffsets()
		return err == nil && last > 0
	})
	fctx, fcancel := context.WithTimeout(ctx, 45*time.Second)
	defer fcancel()
	for {
		m, err := src.Fetch(fctx)
		if err != nil {
			t.Fatalf("partition 1 was not read within 45 s of its first record: %v", err)
		}
		if m.Partition == 1 {
			return
		}
	}
}

// A commit below the group's stored offset (a member's batch landing after
// its partition moved to another member, which committed further) is
// dropped: the broker took it, moving the offset back.
func TestACommitBelowTheStoredOffsetIsDropped(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, read := readTwenty(t, ctx, topic)
	testenv.Must(t, src.Commit(ctx, read[19]), "commit the newer batch")
	testenv.Must(t, src.Commit(ctx, read[9]), "commit the stale batch")
	offs, err := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group").Offsets(ctx)
	testenv.Must(t, err, "read the group's offsets")
	if got := offs[0].Committed; got != 20 {
		t.Fatalf("the group's offset is %d after a stale commit, want it left at 20", got)
	}
}

// Two members' commits can still race an offset back (each reads the
// stored one, then commits): the member that landed the higher position
// commits it again within a tick, so an idle partition's lag and watermark
// do not stay behind until its next record. Past the window after its own
// last commit there, a member leaves the position alone.
func TestAnOffsetRacedBackIsCommittedAgain(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := landedTwenty(t, ctx, topic)
	offsets := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group")
	committed := func() int64 {
		offs, err := offsets.Offsets(ctx)
		testenv.Must(t, err, "read the group's offsets")
		return offs[0].Committed
	}
	// What a racing member's commit leaves: the stored offset moved back
	// past this member's check.
	testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 9}), "move the offset back")
	testenv.Wait(t, 10*time.Second, "the landed position committed again", func() bool { return committed() == 20 })

	src.commitMu.Lock()
	src.landed[0] = landedAt{next: 20, at: time.Now().Add(-recommitWindow - time.Second)}
	src.commitMu.Unlock()
	testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 4}), "move the offset back")
	time.Sleep(10 * src.recommitEvery) // ten ticks
	if got := committed(); got != 5 {
		t.Fatalf("the group's offset is %d: a position committed longer ago than the window was committed again, want it left at 5", got)
	}
}

// A usage topic deleted and made again under its name (the group's stored
// offset gone with it) gets no position of the old topic's committed by
// the re-commits: its records below that position would never be read.
// Neither when no member has committed in the new topic yet, nor when
// another has, and the new log has grown past the old position.
func TestARecommitDoesNotCarryAPositionIntoATopicMadeAgain(t *testing.T) {
	for _, c := range []struct {
		name        string
		otherCommit bool
		want        int64
	}{
		{"no member has committed in the new topic", false, -1},
		{"another member committed in the new topic first", true, 5},
	} {
		t.Run(c.name, func(t *testing.T) {
			topic := testenv.NewTopic(t, 1)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			write := func(n int) {
				t.Helper()
				w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll, BatchTimeout: time.Millisecond}
				defer w.Close()
				var msgs []kafka.Message
				for i := range n {
					msgs = append(msgs, kafka.Message{Value: []byte(strconv.Itoa(i))})
				}
				testenv.Wait(t, 30*time.Second, "records written", func() bool { return w.WriteMessages(ctx, msgs...) == nil })
			}
			src := landedTwenty(t, ctx, topic)

			// No tick falls between the deletion and the other member's
			// commit: the re-commit sees only what came after.
			src.commitMu.Lock()
			client := &kafka.Client{Addr: kafka.TCP(testenv.KafkaBrokers()...), Timeout: 20 * time.Second}
			_, err := client.DeleteTopics(ctx, &kafka.DeleteTopicsRequest{Topics: []string{topic}})
			testenv.Must(t, err, "delete the topic")
			testenv.Wait(t, 30*time.Second, "the topic made again", func() bool {
				res, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
				return err == nil && res.Errors[topic] == nil
			})
			write(30) // past the old position: the log's end does not give it away
			if c.otherCommit {
				// What another member's commit of the new topic's first
				// five records leaves.
				testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 4}), "commit in the new topic")
			}
			src.commitMu.Unlock()
			time.Sleep(20 * src.recommitEvery)
			offs, err := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group").Offsets(ctx)
			testenv.Must(t, err, "read the group's offsets")
			if got := offs[0].Committed; got != c.want {
				t.Fatalf("the topic made again has the group's offset %d, want %d: records below it would never be read", got, c.want)
			}
		})
	}
}

// A re-commit tick that fails to read the group's offsets (the coordinator
// moving, a broker away) does not stop the next ones, and a pause ends once
// nothing is left queued: an offset raced back on an idle partition is
// still repaired.
func TestARecommitAfterAFailedTickStillRepairs(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := landedTwenty(t, ctx, topic)
	src.commitMu.Lock()
	good := src.client
	src.client = &kafka.Client{Addr: kafka.TCP("127.0.0.1:1"), Timeout: 50 * time.Millisecond}
	src.commitMu.Unlock()
	time.Sleep(5 * src.recommitEvery) // ticks that fail
	src.commitMu.Lock()
	src.client = good
	src.commitMu.Unlock()
	testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 9}), "move the offset back")
	offsets := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group")
	testenv.Wait(t, 10*time.Second, "the landed position committed again", func() bool {
		offs, err := offsets.Offsets(ctx)
		return err == nil && offs[0].Committed == 20
	})
	// Paused after a commit whose wait ran out: once kafka-go has answered
	// an empty commit (nothing of the old one is left queued), the
	// re-commits go on, with no commit of the member's own needed.
	src.commitMu.Lock()
	src.recommitPaused = true
	src.commitMu.Unlock()
	testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 9}), "move the offset back again")
	testenv.Wait(t, 10*time.Second, "the landed position committed again after the pause", func() bool {
		offs, err := offsets.Offsets(ctx)
		return err == nil && offs[0].Committed == 20
	})
}

// A raced-back offset below a log whose records retention deleted up to
// the position is left as it is: nothing is left to read below the
// position, and the watermark measures from the log's start (a commit
// would hide, in a topic made again, records deleted before they were
// read).
func TestARecommitLeavesAPositionWhoseRecordsWereDeleted(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := landedTwenty(t, ctx, topic)
	testenv.DeleteRecords(t, topic, 0, 20)
	testenv.Must(t, src.r.CommitMessages(ctx, kafka.Message{Topic: topic, Partition: 0, Offset: 9}), "move the offset back")
	time.Sleep(20 * src.recommitEvery)
	offs, err := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group").Offsets(ctx)
	testenv.Must(t, err, "read the group's offsets")
	if o := offs[0]; o.Committed != 10 || o.Start != 20 || o.End != 20 {
		t.Fatalf("offsets %+v, want committed 10 left below a log that starts and ends at 20", o)
	}
}

// The pause's end rests on kafka-go answering commits in order: the empty
// commit a paused member sends is answered only once a commit queued
// before it (whose wait ran out while the group had no generation) has
// gone out. Here the broker is out of reach until after both are queued.
func TestAPausedMembersEmptyCommitIsAnsweredAfterTheQueuedOne(t *testing.T) {
	topic := testenv.NewTopic(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A port nothing listens on yet, later forwarded to the broker.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "reserve a port")
	addr := l.Addr().String()
	testenv.Must(t, l.Close(), "free the port")
	src := NewSource([]string{addr}, kafkaconn.Security{}, topic, topic+".group")
	src.recommitEvery = time.Minute // no ticks: recommit is called below
	defer src.Close()
	qctx, qcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err = src.r.CommitMessages(qctx, kafka.Message{Topic: topic, Partition: 0, Offset: 9})
	qcancel()
	if !mayStillBeQueued(err) {
		t.Fatalf("a commit with no generation: %v, want its wait to run out", err)
	}
	src.commitMu.Lock()
	src.recommitPaused = true
	src.commitMu.Unlock()
	done := make(chan error, 1)
	go func() { done <- src.recommit(ctx) }()
	// Now the broker can be reached: the group forms, the queued commit
	// goes out, then the empty one.
	fwd, err := net.Listen("tcp", addr)
	testenv.Must(t, err, "listen on the reserved port")
	defer fwd.Close()
	go func() {
		for {
			c, err := fwd.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", testenv.KafkaBrokers()[0])
			if err != nil {
				c.Close()
				continue
			}
			go func() { _, _ = io.Copy(b, c); b.Close() }()
			go func() { _, _ = io.Copy(c, b); c.Close() }()
		}
	}()
	testenv.Must(t, <-done, "recommit while paused")
	src.commitMu.Lock()
	paused := src.recommitPaused
	src.commitMu.Unlock()
	offs, err := NewOffsets(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group").Offsets(ctx)
	testenv.Must(t, err, "read the group's offsets")
	if paused || offs[0].Committed != 10 {
		t.Fatalf("after the empty commit was answered: paused %v, the group's offset %d; want the pause over and the queued commit (10) already stored", paused, offs[0].Committed)
	}
}

// readTwenty writes 20 records to topic's one partition and returns a
// member that has read them (re-committing every 100 ms once it commits),
// and what it read; the member leaves the group when the test ends.
func readTwenty(t *testing.T, ctx context.Context, topic string) (*Source, []ingest.Message) {
	t.Helper()
	w := &kafka.Writer{Addr: kafka.TCP(testenv.KafkaBrokers()...), Topic: topic, RequiredAcks: kafka.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	var msgs []kafka.Message
	for i := range 20 {
		msgs = append(msgs, kafka.Message{Value: []byte(strconv.Itoa(i))})
	}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "write 20 records")
	src := NewSource(testenv.KafkaBrokers(), kafkaconn.Security{}, topic, topic+".group")
	src.recommitEvery = 100 * time.Millisecond
	t.Cleanup(func() { _ = src.Close() })
	var read []ingest.Message
	for len(read) < 20 {
		m, err := src.Fetch(ctx)
		testenv.Must(t, err, "read")
		read = append(read, m)
	}
	return src, read
}

// landedTwenty is readTwenty's member after it committed the 20 records
// as landed.
func landedTwenty(t *testing.T, ctx context.Context, topic string) *Source {
	t.Helper()
	src, read := readTwenty(t, ctx, topic)
	testenv.Must(t, src.Commit(ctx, read[19]), "commit the batch")
	return src
}

// Only a commit whose wait ran out pauses the re-commits: kafka-go may
// still send it. A commit kafka-go answered (refused in a rebalance, or a
// closed reader's) is done with, and pausing for it stopped an idle
// member's repair for good.
func TestOnlyACommitWhoseWaitRanOutMayStillBeQueued(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{context.DeadlineExceeded, true},
		{fmt.Errorf("commit offsets: %w", context.DeadlineExceeded), true},
		{io.ErrClosedPipe, false},
		{kafka.RebalanceInProgress, false},
		{fmt.Errorf("commit: %w", kafka.IllegalGeneration), false},
		{context.Canceled, false},
	} {
		if got := mayStillBeQueued(c.err); got != c.want {
			t.Errorf("%v: may still be queued %v, want %v", c.err, got, c.want)
		}
	}
}

// A record without a timestamp is the same record whichever way it was
// read: kafka-go's reader gives it the zero time, a fetch the Unix time.
func TestRecordMillisReadsNoTimestampAsNone(t *testing.T) {
	for _, c := range []struct {
		a, b time.Time
		same bool
	}{
		{time.Time{}, time.Unix(0, 0), true},
		{time.Time{}, time.UnixMilli(-1), true},
		{time.UnixMilli(1764460800123), time.UnixMilli(1764460800123).UTC(), true},
		{time.UnixMilli(1764460800123), time.UnixMilli(1764460800124), false},
		{time.Time{}, time.UnixMilli(1), false},
	} {
		if got := recordMillis(c.a) == recordMillis(c.b); got != c.same {
			t.Errorf("%v and %v: same %v, want %v", c.a, c.b, got, c.same)
		}
	}
}

// refusedOnce answers the first produce as a broker whose partition has no
// leader yet (a topic just created), without passing it on.
type refusedOnce struct {
	kafka.RoundTripper
	refused atomic.Bool
}

func (r *refusedOnce) RoundTrip(ctx context.Context, addr net.Addr, req protocol.Message) (protocol.Message, error) {
	if pr, ok := req.(*produce.Request); ok && r.refused.CompareAndSwap(false, true) {
		return notLeader(pr), nil
	}
	return r.RoundTripper.RoundTrip(ctx, addr, req)
}

// A produce the broker refused before appending (no leader yet, or a moved
// one) is sent again, once, and the dead letter is written once. It failed
// the Reject, which on a topic just created failed ingest's step.
func TestAProduceRefusedUnwrittenIsSentAgain(t *testing.T) {
	ctx, d := newDeadLetters(t, 1, 1)
	ro := &refusedOnce{RoundTripper: kafka.DefaultTransport}
	d.client.Transport = ro
	testenv.Must(t, d.Reject(ctx, rejected(0, 4)),
		"dead-letter a record whose first produce is refused")
	if !ro.refused.Load() {
		t.Fatal("no produce was refused")
	}
	if got, want := deadLetterOrigins(t, d.dlq, 0), "0@4"; got != want {
		t.Fatalf("dead letters %s, want %s", got, want)
	}
}

// appendedThenRefused passes the first produce to the broker and then
// answers it "not leader", as a leader that appended the batch and lost
// its place while waiting for its replicas does.
type appendedThenRefused struct {
	kafka.RoundTripper
	done atomic.Bool
}

func (a *appendedThenRefused) RoundTrip(ctx context.Context, addr net.Addr, req protocol.Message) (protocol.Message, error) {
	res, err := a.RoundTripper.RoundTrip(ctx, addr, req)
	if pr, ok := req.(*produce.Request); ok && err == nil && a.done.CompareAndSwap(false, true) {
		return notLeader(pr), nil
	}
	return res, err
}

// "Not leader" can also come after the broker appended the batch: the
// retry reads what was written first, and writes each dead letter once.
func TestANotLeaderAnswerAfterTheAppendWritesOnce(t *testing.T) {
	ctx, d := newDeadLetters(t, 1, 1)
	d.client.Transport = &appendedThenRefused{RoundTripper: kafka.DefaultTransport}
	testenv.Must(t, d.Reject(ctx, rejected(0, 4)),
		"dead-letter a record whose append is answered 'not leader'")
	if got, want := deadLetterOrigins(t, d.dlq, 0), "0@4"; got != want {
		t.Fatalf("dead letters %s, want %s", got, want)
	}
}

// newDeadLetters makes a usage topic of srcParts partitions and a
// dead-letter topic of dlqParts for this test, and a writer between them,
// closed with the test; the context ends after a minute.
func newDeadLetters(t *testing.T, srcParts, dlqParts int) (context.Context, *DeadLetters) {
	t.Helper()
	src := testenv.NewTopic(t, srcParts)
	testenv.CreateTopic(t, src+".dlq", dlqParts)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, src+".dlq", src)
	t.Cleanup(func() { _ = d.Close() })
	return ctx, d
}

// rejected are partition p's records at offsets, each malformed.
func rejected(p int, offsets ...int64) []ingest.Rejected {
	var rs []ingest.Rejected
	for _, o := range offsets {
		rs = append(rs, ingest.Rejected{Message: ingest.Message{Partition: p, Offset: o, Value: []byte("{")}, Reason: "truncated JSON"})
	}
	return rs
}

// notLeader is a broker's answer to pr that it is not the leader of any of
// its partitions.
func notLeader(pr *produce.Request) *produce.Response {
	res := &produce.Response{}
	for _, t := range pr.Topics {
		rt := produce.ResponseTopic{Topic: t.Topic}
		for _, p := range t.Partitions {
			rt.Partitions = append(rt.Partitions, produce.ResponsePartition{Partition: p.Partition, ErrorCode: int16(kafka.NotLeaderForPartition)})
		}
		res.Topics = append(res.Topics, rt)
	}
	return res
}

// A record the usage topic takes, of thousands of dimension keys each
// invalid, is dead-lettered whole with a reason of bounded size. Before,
// its reason listed every key, ten times the record's size, and neither
// its dead letter nor the fallback without its bytes fit the topic: the
// worker retried for ever and every partition it owned stalled.
func TestARecordOfManyBadDimensionKeysIsDeadLetteredWhole(t *testing.T) {
	src := testenv.NewTopic(t, 1)
	dlq := src + ".dlq"
	createDeadLetterTopic(t, DeadLetterTopic(dlq, 1))

	now := time.Now().UTC()
	rec := []byte(`{"v":1,"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293","account_id":"acct_1","env":"live","key_id":"key_1","type":"api_call","time":"` +
		now.Add(-time.Minute).Format(time.RFC3339Nano) + `","units":1,"dimensions":{`)
	for i := 0; len(rec) < 900_000; i++ {
		if i > 0 {
			rec = append(rec, ',')
		}
		rec = append(rec, `"A`+strconv.FormatInt(int64(i), 16)+`":""`...)
	}
	rec = append(rec, "}}"...)
	off := produceLarge(t, src, []byte("acct_1"), rec)
	events, late, rejected, _ := ingest.Split([]ingest.Message{{Partition: 0, Offset: off, Key: []byte("acct_1"), Value: rec, Time: now}}, now, 35*24*time.Hour)
	if len(events) != 0 || len(late) != 0 || len(rejected) != 1 {
		t.Fatalf("split: %d events, %d late, %d rejected; want the record rejected", len(events), len(late), len(rejected))
	}
	if n := len(rejected[0].Reason); n > ingest.MaxReasonBytes || !strings.HasPrefix(rejected[0].Reason, "invalid event: dimensions") {
		t.Fatalf("reason of %d bytes (at most %d): %.200s", n, ingest.MaxReasonBytes, rejected[0].Reason)
	}
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, src)
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.Must(t, d.Reject(ctx, rejected), "dead-letter the record")

	got := readDeadLetters(t, dlq)
	if len(got) != 1 || !bytes.Equal(got[0].Value, rec) || header(got[0], HeaderReason) != rejected[0].Reason ||
		header(got[0], HeaderSourceOffset) != strconv.FormatInt(off, 10) {
		t.Fatalf("%d dead letters, want the record whole with its reason", len(got))
	}
}

// A dead-letter topic made elsewhere with a limit below one write's batch
// (the limit is on the whole batch) but above each record takes them one at
// a time, each whole, in order. Before, the partition stopped for good.
func TestADeadLetterTopicWithASmallLimitTakesRecordsOneAtATime(t *testing.T) {
	src := testenv.NewTopic(t, 1)
	dlq := src + ".dlq"
	createDeadLetterTopic(t, kafka.TopicConfig{Topic: dlq, NumPartitions: 1, ReplicationFactor: 1,
		ConfigEntries: []kafka.ConfigEntry{{ConfigName: "max.message.bytes", ConfigValue: "100000"}}})

	var batch []ingest.Rejected
	for i := range 3 {
		batch = append(batch, ingest.Rejected{Message: ingest.Message{Partition: 0, Offset: int64(i + 1),
			Value: bytes.Repeat([]byte{'a' + byte(i)}, 60_000)}, Reason: "not JSON"})
	}
	d := NewDeadLetters(testenv.KafkaBrokers(), kafkaconn.Security{}, dlq, src)
	defer d.Close()
	for round := range 2 { // the second is a redelivery after a crash before the commit
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := d.Reject(ctx, batch)
		cancel()
		testenv.Must(t, err, "dead-letter round "+strconv.Itoa(round))
	}

	got := readDeadLetters(t, dlq)
	if len(got) != len(batch) {
		t.Fatalf("%d dead letters, want %d", len(got), len(batch))
	}
	for i, m := range got {
		if !bytes.Equal(m.Value, batch[i].Message.Value) || header(m, HeaderSourceOffset) != strconv.Itoa(i+1) {
			t.Fatalf("dead letter %d: %d bytes of %q, source offset %s", i, len(m.Value), m.Value[:1], header(m, HeaderSourceOffset))
		}
	}
}

// A dead-letter topic deleted while ingest runs is made again by the next
// Reject, as ingest makes it at start. Before, every Reject failed
// (Unknown Topic Or Partition), and the worker that met a malformed record
// held its batch, valid events and all, until the topic was made by hand or
// ingest restarted.
func TestADeadLetterTopicDeletedWhileIngestRunsIsMadeAgain(t *testing.T) {
	ctx, d := newDeadLetters(t, 2, 2)
	testenv.Must(t, d.Reject(ctx, rejected(0, 0)), "a dead letter before the deletion")
	client := &kafka.Client{Addr: kafka.TCP(testenv.KafkaBrokers()...), Timeout: 20 * time.Second}
	_, err := client.DeleteTopics(ctx, &kafka.DeleteTopicsRequest{Topics: []string{d.dlq}})
	testenv.Must(t, err, "delete the dead-letter topic")
	testenv.Wait(t, 30*time.Second, "the dead-letter topic gone", func() bool {
		md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{d.dlq}})
		return err == nil && len(md.Topics) == 1 && errors.Is(md.Topics[0].Error, kafka.UnknownTopicOrPartition)
	})
	// Retried as ingest retries a failed step; it must come through.
	var last error
	testenv.Wait(t, 45*time.Second, "partition 1's dead letter written after the deletion", func() bool {
		last = d.Reject(ctx, rejected(1, 3))
		return last == nil
	})
	if got, want := deadLetterOrigins(t, d.dlq, 1), "1@3"; got != want {
		t.Errorf("dead-letter partition 1 holds %s, want %s", got, want)
	}
	res, err := client.DescribeConfigs(ctx, &kafka.DescribeConfigsRequest{Resources: []kafka.DescribeConfigRequestResource{{
		ResourceType: kafka.ResourceTypeTopic, ResourceName: d.dlq, ConfigNames: []string{"max.message.bytes"}}}})
	testenv.Must(t, err, "describe the dead-letter topic")
	if len(res.Resources) != 1 || len(res.Resources[0].ConfigEntries) != 1 ||
		res.Resources[0].ConfigEntries[0].ConfigValue != strconv.Itoa(DeadLetterMaxBytes) {
		t.Errorf("the dead-letter topic made again has %+v, want max.message.bytes %d", res.Resources, DeadLetterMaxBytes)
	}
}
