package kafka

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/protocol/produce"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// gatedProduce lets allow produce requests through (each delay late) and
// refuses the others.
type gatedProduce struct {
	kafka.RoundTripper
	allow *atomic.Int64
	delay time.Duration
}

func (g gatedProduce) RoundTrip(ctx context.Context, addr net.Addr, req kafka.Request) (kafka.Response, error) {
	if _, ok := req.(*produce.Request); ok {
		if g.allow.Add(-1) < 0 {
			return nil, errors.New("kafka refuses (test)")
		}
		time.Sleep(g.delay)
	}
	return g.RoundTripper.RoundTrip(ctx, addr, req)
}

// holdChild runs the test again as a child, which calls FillDisk so that
// every spool append fails.
func holdChild(t *testing.T) bool {
	if os.Getenv("TOLLGATE_HOLD_CHILD") != "" {
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v")
	cmd.Env = append(os.Environ(), "TOLLGATE_HOLD_CHILD=1", "TOLLGATE_HOLD_TOPIC="+testenv.NewTopic(t, 2))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child with a full disk: %v\n%s", err, out)
	}
	return false
}

// FillDisk makes every later file write of this process fail (a per-process
// file size limit of one byte), as a full disk does; the tests call it in a
// child process of their own.
func FillDisk(t *testing.T) {
	var lim syscall.Rlimit
	testenv.Must(t, syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim), "get file size limit")
	lim.Cur = 1
	testenv.Must(t, syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim), "set file size limit")
}

// A batch the disk and Kafka both refused waits in memory under the
// spool's hold; the spool draining meanwhile (Kafka took one write) does
// not release it. It did, and never took it again.
func TestTheHoldStaysWhileABatchWaitsInMemory(t *testing.T) {
	if !holdChild(t) {
		return
	}
	dir := t.TempDir()
	sp, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "open spool")
	recs := make([][]byte, 5)
	for i := range recs {
		recs[i] = message(UsageEvent("acct_spooled")).Value
	}
	testenv.Must(t, sp.Append(recs), "spool")
	testenv.Must(t, sp.Close(), "close spool")
	var allow atomic.Int64
	p, err := NewProducer(Config{Brokers: testenv.KafkaBrokers(), Topic: os.Getenv("TOLLGATE_HOLD_TOPIC"), SpoolDir: dir,
		CloseTimeout: 2 * time.Second}, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	p.w.Transport = gatedProduce{RoundTripper: p.w.Transport, allow: &allow}
	FillDisk(t)
	for range 3 {
		p.Emit(UsageEvent("acct_in_memory"))
	}
	time.Sleep(500 * time.Millisecond)
	allow.Store(1) // one write: the spool's drain
	testenv.Wait(t, 10*time.Second, "the spool drained", func() bool { return p.SpoolDepth() == 0 })
	time.Sleep(1500 * time.Millisecond)
	if h := p.SpoolHold(); h.Since.IsZero() || !h.Released.IsZero() {
		t.Fatalf("hold %+v while 3 events wait in memory, delivered nowhere; want it held", h)
	}
	allow.Store(1 << 30)
	testenv.Wait(t, 10*time.Second, "every event delivered and the hold released", func() bool {
		return testutil.ToFloat64(p.produced) == 8 && !p.SpoolHold().Released.IsZero()
	})
	testenv.Must(t, p.Close(), "close")
}

// Once the batch in hand is delivered, the events queued behind it during
// the trouble still hold the period: the hold goes only when they are
// delivered too. It went with the first batch, 300 events early.
func TestTheHoldWaitsForTheEventsQueuedBehindTheTrouble(t *testing.T) {
	if !holdChild(t) {
		return
	}
	var allow atomic.Int64
	p, err := NewProducer(Config{Brokers: testenv.KafkaBrokers(), Topic: os.Getenv("TOLLGATE_HOLD_TOPIC"), SpoolDir: t.TempDir(),
		BatchSize: 100, CloseTimeout: 2 * time.Second}, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	p.w.Transport = gatedProduce{RoundTripper: p.w.Transport, allow: &allow, delay: 100 * time.Millisecond}
	FillDisk(t)
	for range 500 {
		p.Emit(UsageEvent("acct_queued"))
	}
	time.Sleep(500 * time.Millisecond)
	allow.Store(1 << 30)
	var producedAtRelease float64
	testenv.Wait(t, 20*time.Second, "the hold released", func() bool {
		if p.SpoolHold().Released.IsZero() {
			return false
		}
		producedAtRelease = testutil.ToFloat64(p.produced)
		return true
	})
	if producedAtRelease != 500 {
		t.Fatalf("hold released with %v of the 500 events delivered", producedAtRelease)
	}
	testenv.Must(t, p.Close(), "close")
}

// A restart holds usage from the oldest event in the spool. Server-reported
// usage can be weeks old and anywhere in it, and the earlier run's hold may
// not have reached Postgres before a kill; the hold started at the first
// spooled record, so a period holding an older event could close without it.
func TestARestartHoldsFromTheOldestSpooledEvent(t *testing.T) {
	dir := t.TempDir()
	sp, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "open spool")
	if _, ok := sp.Oldest(); ok {
		t.Fatal("an empty spool has an oldest event")
	}
	now := time.Now()
	var recs [][]byte
	for _, age := range []time.Duration{time.Minute, 20 * 24 * time.Hour, 3 * 24 * time.Hour, 0} {
		ev := UsageEvent("acct_spooled")
		ev.Time = now.Add(-age)
		recs = append(recs, message(ev).Value)
	}
	recs = append(recs, []byte("not an event"))
	testenv.Must(t, sp.Append(recs), "spool")
	testenv.Must(t, sp.Close(), "close spool")

	sp, err = OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "reopen spool")
	oldest, ok := sp.Oldest()
	if want := now.Add(-20 * 24 * time.Hour); !ok || !oldest.Equal(want) {
		t.Fatalf("oldest spooled event %v (%v), want %v", oldest, ok, want)
	}
	testenv.Must(t, sp.Close(), "close spool")

	// A topic that does not exist: every event stays in the spool.
	p, err := NewProducer(Config{Brokers: testenv.KafkaBrokers(), Topic: "tollgate.no-such-topic." + schemas.NewEventID().String(), SpoolDir: dir,
		CloseTimeout: 500 * time.Millisecond}, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer p.Close()
	if h := p.SpoolHold(); !h.Since.Equal(oldest) || !h.Released.IsZero() {
		t.Fatalf("hold %+v after a restart, want it held since the oldest spooled event, %v", h, oldest)
	}
}

// A hold released and replaced within one sync of the hold store never
// reached Postgres, so the new hold, starting at its own events, let go of
// the released one's earlier events, which had reached Kafka late. A new
// hold keeps the since of a released one not yet stored; one the store
// has stored it merges itself, and a new hold starts at its own events.
func TestANewHoldKeepsTheSinceOfOneJustReleased(t *testing.T) {
	rec := func(at time.Time) []byte {
		e := schemas.Event{Version: schemas.EventVersion, ID: schemas.NewEventID(), AccountID: "acct_hold", Environment: schemas.Live,
			KeyID: "key_hold", Type: "api_call", Time: at, Units: 1}
		b, err := e.Encode()
		testenv.Must(t, err, "encode")
		return b
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	early, later := now.Add(-time.Hour), now.Add(-time.Minute)
	p := &Producer{}
	p.held([][]byte{rec(early)})
	p.released(time.Now())
	p.held([][]byte{rec(later)})
	if h := p.SpoolHold(); !h.Since.Equal(early) || !h.Released.IsZero() {
		t.Fatalf("hold %+v just after a release; want since %s, the released hold's, unreleased", h, early)
	}
	p.released(time.Now())
	p.HoldStored(p.SpoolHold()) // the store has the released row
	p.held([][]byte{rec(later)})
	if h := p.SpoolHold(); !h.Since.Equal(later) {
		t.Fatalf("hold %+v after a release the store has; want since %s, its own events'", h, later)
	}
}
