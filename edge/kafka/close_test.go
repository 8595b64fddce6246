package kafka_test

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Calls can outlive a server's graceful stop and emit while the producer
// closes, or after. None of that may panic, and every event must end up
// in Kafka, in the spool, or counted as lost.
func TestEventsEmittedAroundCloseAreDeliveredSpooledOrCounted(t *testing.T) {
	brokers, topic, dir := testenv.KafkaBrokers(), testenv.NewTopic(t, 1), t.TempDir()
	reg := prometheus.NewRegistry()
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: dir, CloseTimeout: 10 * time.Second},
		reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")

	var emitted atomic.Int64
	closed := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			after := 0
			for after < 20 {
				ev := schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_close",
					Environment: schemas.Live, KeyID: "key_close", Type: "api_call", Time: time.Now(), Route: "/v1/x",
					Method: "GET", Status: 200, Units: 1}
				ev.Normalize()
				p.Emit(ev)
				emitted.Add(1)
				select {
				case <-closed:
					after++ // keep emitting a while after Close has returned
				default:
				}
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	testenv.Must(t, p.Close(), "close producer")
	close(closed)
	wg.Wait()

	lost := int64(testutil.ToFloat64(p.Lost()))
	sp, err := edgekafka.OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "reopen spool")
	spooled := sp.Depth()
	testenv.Must(t, sp.Close(), "close spool")
	n := emitted.Load()
	if lost < 80 {
		t.Fatalf("%d events counted lost; the 80 emitted after Close returned must be", lost)
	}
	inKafka := edgetest.ReadTopic(t, brokers, topic, int(n-spooled-lost), 30*time.Second)
	seen := map[string]bool{}
	for _, ev := range inKafka {
		if seen[ev.ID.String()] {
			t.Fatalf("event %s is in the topic twice", ev.ID)
		}
		seen[ev.ID.String()] = true
	}
	if int64(len(inKafka))+spooled+lost != n {
		t.Fatalf("%d emitted: %d in Kafka + %d spooled + %d lost", n, len(inKafka), spooled, lost)
	}
	t.Logf("%d emitted: %d in Kafka, %d spooled, %d lost", n, len(inKafka), spooled, lost)
}
