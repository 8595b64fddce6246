package kafka

import (
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// UsageEvent is an API call of account for the tests, which those outside
// the package use too.
func UsageEvent(account string) schemas.Event {
	ev := schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: account,
		Environment: schemas.Live, KeyID: "key_test", Type: "api_call", Time: time.Now(), Route: "/v1/x",
		Method: "GET", Status: 200, Units: 1}
	ev.Normalize()
	return ev
}

// With Kafka unreachable, a moment without a free file descriptor when the
// spool starts a new segment holds events back only for that moment: Emit
// keeps returning, and every event ends up in the spool once.
func TestEmitKeepsReturningAfterASegmentCouldNotBeOpened(t *testing.T) {
	dir := t.TempDir()
	logs := &testenv.LogBuffer{}
	p, err := NewProducer(Config{Brokers: []string{"127.0.0.1:1"}, Topic: "usage.unreachable", SpoolDir: dir,
		QueueSize: 100, CloseTimeout: time.Second}, nil, slog.New(slog.NewTextHandler(logs, nil)))
	testenv.Must(t, err, "new producer")
	p.spool.maxSeg = 1 // every append starts a new segment; set before the first event reaches the spool
	for range 20 {
		p.Emit(UsageEvent("acct_roll"))
	}
	testenv.Wait(t, 10*time.Second, "20 events spooled", func() bool { return testutil.ToFloat64(p.spooled) == 20 })

	withoutFreeFileDescriptors(t, func() {
		p.Emit(UsageEvent("acct_roll"))
		testenv.Wait(t, 10*time.Second, "a failed spool append", func() bool { return logs.Contains("spool append failed") })
	})

	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 300 {
			p.Emit(UsageEvent("acct_roll"))
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("Emit blocked once files could be opened again: %v spooled, depth %d, queue %d",
			testutil.ToFloat64(p.spooled), p.SpoolDepth(), len(p.queue))
	}
	testenv.Wait(t, 30*time.Second, "321 events spooled", func() bool { return testutil.ToFloat64(p.spooled) == 321 })
	_ = p.Close()

	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "reopen spool")
	defer s.Close()
	rs, _, err := s.Read(1000)
	testenv.Must(t, err, "read spool")
	seen := map[string]bool{}
	for _, r := range rs {
		seen[string(r)] = true
	}
	if s.Depth() != 321 || len(rs) != 321 || len(seen) != 321 {
		t.Errorf("spool holds %d events, %d read, %d distinct; want 321", s.Depth(), len(rs), len(seen))
	}
}

// A corrupt region in the spool shows in the producer's metrics.
func TestProducerCountsCorruptSpoolRegions(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "open spool")
	s.maxSeg = 200 // each append of ten 21-byte records fills a segment
	for i := range 2 {
		testenv.Must(t, s.Append(recs(i*10, 10)), "append")
	}
	testenv.Must(t, s.Close(), "close spool")
	b, err := os.ReadFile(s.path(1))
	testenv.Must(t, err, "read segment")
	b[recordHeader] ^= 0xff
	testenv.Must(t, os.WriteFile(s.path(1), b, 0o640), "corrupt segment")

	reg := prometheus.NewRegistry()
	p, err := NewProducer(Config{Brokers: []string{"127.0.0.1:1"}, Topic: "usage.unreachable", SpoolDir: dir,
		CloseTimeout: 100 * time.Millisecond}, reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer p.Close()
	regions, size := MetricValue(t, reg, "tollgate_edge_spool_corrupt_regions_total"), MetricValue(t, reg, "tollgate_edge_spool_corrupt_bytes_total")
	if regions != 1 || size != 21 {
		t.Errorf("%v corrupt regions of %v bytes in the metrics, want one of 21", regions, size)
	}
}

// MetricValue is the value of reg's counter or gauge name, for the tests,
// which those outside the package use too.
func MetricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather metrics")
	for _, mf := range mfs {
		if mf.GetName() == name {
			if c := mf.GetMetric()[0].GetCounter(); c != nil {
				return c.GetValue()
			}
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
