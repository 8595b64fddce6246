package kafka

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
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

// readDeadLetters reads every message in partition 0 of topic.
func readDeadLetters(t *testing.T, topic string) []kafka.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := kafka.DialLeader(ctx, "tcp", testenv.KafkaBrokers()[0], topic, 0)
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
	client := &kafka.Client{Addr: kafka.TCP(testenv.KafkaBrokers()...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{DeadLetterTopic(dlq, 1)}})
	if err != nil {
		testenv.Unreachable(t, "Kafka", strings.Join(testenv.KafkaBrokers(), ","), err)
	}
	testenv.Must(t, res.Errors[dlq], "create the dead-letter topic")
	t.Cleanup(func() {
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{dlq}})
	})

	big := bytes.Repeat([]byte("x"), 1_048_450) // about the most a 1 MiB topic takes in one record
	off := produceLarge(t, src, []byte("acct_big"), big)
	d := NewDeadLetters(testenv.KafkaBrokers(), dlq, src)
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
	d := NewDeadLetters(testenv.KafkaBrokers(), dlq, src)
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
	d := NewDeadLetters(testenv.KafkaBrokers(), dlq, src)
	defer d.Close()
	d.w.Transport = &lostReply{RoundTripper: kafka.DefaultTransport}
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
	old := NewDeadLetters(testenv.KafkaBrokers(), dlq, oldSrc)
	testenv.Must(t, old.Reject(ctx, []ingest.Rejected{{Message: ingest.Message{Partition: 0, Offset: 500, Value: []byte("{")}, Reason: "old"}}), "old topic's dead letter")
	testenv.Must(t, old.Close(), "close")
	d := NewDeadLetters(testenv.KafkaBrokers(), dlq, newSrc)
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
