package kafka

import (
	"context"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/protocol/produce"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// slowProduce answers every produce request, 200 ms late, and counts the
// ones started after by.
type slowProduce struct {
	kafka.RoundTripper
	late, by *atomic.Int64
}

func (s slowProduce) RoundTrip(ctx context.Context, addr net.Addr, req kafka.Request) (kafka.Response, error) {
	if _, ok := req.(*produce.Request); ok {
		if by := s.by.Load(); by != 0 && time.Now().UnixNano() > by {
			s.late.Add(1)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return s.RoundTripper.RoundTrip(ctx, addr, req)
}

// A graceful stop draining a long spool into a Kafka that answers, slowly,
// starts no write past its deadline: it overran it by a write per batch
// left (8 s for a 3 s deadline here; minutes at a write's timeout). What
// is not delivered stays in the spool for the next start.
func TestAStopDrainingTheSpoolKeepsItsDeadline(t *testing.T) {
	brokers, topic, dir := testenv.KafkaBrokers(), testenv.NewTopic(t, 1), t.TempDir()
	sp, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "open spool")
	for range 40 {
		recs := make([][]byte, 1000)
		for i := range recs {
			recs[i] = message(UsageEvent("acct_deadline")).Value
		}
		testenv.Must(t, sp.Append(recs), "spool")
	}
	testenv.Must(t, sp.Close(), "close spool")
	p, err := NewProducer(Config{Brokers: brokers, Topic: topic, SpoolDir: dir, CloseTimeout: 3 * time.Second},
		nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	var late, by atomic.Int64
	p.w.Transport = slowProduce{RoundTripper: p.w.Transport, late: &late, by: &by}
	start := time.Now()
	by.Store(start.Add(3 * time.Second).UnixNano())
	testenv.Must(t, p.Close(), "close")
	took := time.Since(start)
	t.Logf("stop took %s; %d writes started after the deadline; %d events left in the spool", took, late.Load(), p.spool.Depth())
	if late.Load() > 0 {
		t.Fatalf("%d Kafka writes started after the stop's deadline (the stop took %s of its 3 s)", late.Load(), took)
	}
}
