package kafka

import (
	"context"
	"net"
	"sync/atomic"
	"testing"

	"github.com/segmentio/kafka-go"
	metadataAPI "github.com/segmentio/kafka-go/protocol/metadata"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// countingTransport counts the requests that reach the real transport.
type countingTransport struct {
	kafka.RoundTripper
	n atomic.Int64
}

func (c *countingTransport) RoundTrip(ctx context.Context, addr net.Addr, req kafka.Request) (kafka.Response, error) {
	c.n.Add(1)
	return c.RoundTripper.RoundTrip(ctx, addr, req)
}

// TestTopicMetadataIsReusedOnlyWhenGood: the Writer's per-message lookup
// of a real topic reaches the broker's transport once and is answered
// from the last answer after that; a topic that does not exist is asked
// again every time, and other requests always pass through.
func TestTopicMetadataIsReusedOnlyWhenGood(t *testing.T) {
	brokers, topic := testenv.KafkaBrokers(), testenv.NewTopic(t, 3)
	real := &countingTransport{RoundTripper: kafka.DefaultTransport}
	tm := &topicMetadata{RoundTripper: real}
	addr := kafka.TCP(brokers...)
	ask := func(name string) *metadataAPI.Response {
		t.Helper()
		r, err := tm.RoundTrip(context.Background(), addr, &metadataAPI.Request{TopicNames: []string{name}})
		if err != nil {
			t.Fatalf("metadata of %s: %v (is Kafka up? make services)", name, err)
		}
		return r.(*metadataAPI.Response)
	}
	for i := range 100 {
		r := ask(topic)
		if len(r.Topics) != 1 || len(r.Topics[0].Partitions) != 3 {
			t.Fatalf("lookup %d: %+v, want the topic's 3 partitions", i, r.Topics)
		}
	}
	if got := real.n.Load(); got != 1 {
		t.Fatalf("%d lookups reached the transport for 100 asks, want 1", got)
	}
	missing := topic + ".missing"
	before := real.n.Load()
	for range 3 {
		ask(missing)
	}
	if got := real.n.Load() - before; got != 3 {
		t.Fatalf("%d of 3 lookups of a missing topic reached the transport, want all", got)
	}
	before = real.n.Load()
	if _, err := tm.RoundTrip(context.Background(), addr, &metadataAPI.Request{}); err != nil {
		t.Fatal(err)
	}
	if real.n.Load() != before+1 {
		t.Fatal("a lookup of every topic did not reach the transport")
	}
}
