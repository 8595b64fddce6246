package kafka

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/segmentio/kafka-go"
)

func TestDeadLetterChunksAreEachOneProduceBatch(t *testing.T) {
	var msgs []kafka.Message
	for i := range 2500 {
		size := 100
		switch {
		case i%500 == 7:
			size = 400_000 // large enough that two do not share a chunk
		case i == 1234:
			size = 900_000 // larger than a chunk's bound: a chunk of its own
		}
		msgs = append(msgs, kafka.Message{Key: []byte(fmt.Sprint(i)), Value: bytes.Repeat([]byte("x"), size),
			Headers: []kafka.Header{{Key: HeaderReason, Value: []byte("bad")}}})
	}
	const n, maxBytes = 1000, 512 << 10
	chunks := deadLetterChunks(msgs, n, maxBytes)
	next := 0
	for i, c := range chunks {
		if len(c) == 0 || len(c) > n {
			t.Fatalf("chunk %d has %d messages", i, len(c))
		}
		size := 0
		for _, m := range c {
			if string(m.Key) != fmt.Sprint(next) {
				t.Fatalf("chunk %d: message %s where %d was next", i, m.Key, next)
			}
			next++
			size += len(m.Value)
		}
		if len(c) > 1 && size > maxBytes {
			t.Errorf("chunk %d of %d messages holds %d bytes, more than %d", i, len(c), size, maxBytes)
		}
	}
	if next != len(msgs) {
		t.Fatalf("chunks hold %d messages, want %d", next, len(msgs))
	}
	for i, c := range chunks {
		large := 0
		for _, m := range c {
			if len(m.Value) >= 400_000 {
				large++
			}
			if string(m.Key) == "1234" && len(c) != 1 {
				t.Errorf("chunk %d holds the oversized message with %d others", i, len(c)-1)
			}
		}
		if large > 1 {
			t.Errorf("chunk %d holds %d large messages", i, large)
		}
	}
}
