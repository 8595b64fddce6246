package kafka_test

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/segmentio/kafka-go"

	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// The tests below run the test binary again as a child that cannot write
// files past one byte (a per-process file size limit), so every spool
// append fails as on a full disk, while the parent's files are unaffected.
const diskFullChild = "TOLLGATE_DISK_FULL_CHILD"

func runDiskFullChild(t *testing.T, name string, env ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+name+"$", "-test.v")
	cmd.Env = append(append(os.Environ(), diskFullChild+"=1"), env...)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child with a full disk: %v\n%s", err, out)
	}
}

// With the disk refusing the spool, events Kafka refused stay in memory
// and go straight to Kafka, once each, as soon as it takes them.
func TestDiskFullEventsWaitForKafkaInsteadOfTheSpool(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	if os.Getenv(diskFullChild) != "" {
		topic := os.Getenv("TOLLGATE_DISK_FULL_TOPIC")
		reg := prometheus.NewRegistry()
		p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: t.TempDir(),
			CloseTimeout: 5 * time.Second}, reg, slog.New(slog.DiscardHandler))
		testenv.Must(t, err, "new producer")
		edgekafka.FillDisk(t)
		// The topic does not exist yet, so Kafka refuses the first writes.
		for range 50 {
			p.Emit(edgekafka.UsageEvent("acct_disk"))
		}
		time.Sleep(1500 * time.Millisecond)
		if p.KafkaUp() {
			t.Fatal("Kafka took events for a topic that does not exist")
		}
		// The events of answered calls wait in memory only: the spool's
		// hold covers them, so the invoicer closes no period without them.
		if h := p.SpoolHold(); h.Since.IsZero() || !h.Released.IsZero() || h.Since.After(time.Now().Add(-1400*time.Millisecond)) {
			t.Fatalf("hold %+v while 50 events wait in memory; want one held since they were emitted", h)
		}
		client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
		res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
			Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
		testenv.Must(t, err, "create topic")
		testenv.Must(t, res.Errors[topic], "create topic")
		testenv.Wait(t, 30*time.Second, "the 50 events in Kafka", func() bool {
			return testutil.ToFloat64(p.Lost()) == 0 && p.KafkaUp() && p.SpoolDepth() == 0 && produced(t, reg) == 50
		})
		if h := p.SpoolHold(); h.Released.IsZero() {
			t.Fatalf("hold %+v once every event is in Kafka; want it released", h)
		}
		testenv.Must(t, p.Close(), "close producer")
		return
	}
	topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
	t.Cleanup(func() {
		client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	})
	runDiskFullChild(t, t.Name(), "TOLLGATE_DISK_FULL_TOPIC="+topic)
	evs := edgetest.ReadTopic(t, brokers, topic, 50, 30*time.Second)
	seen := map[string]bool{}
	for _, ev := range evs {
		if seen[ev.ID.String()] {
			t.Fatalf("event %s is in the topic twice", ev.ID)
		}
		seen[ev.ID.String()] = true
	}
	if len(seen) != 50 {
		t.Fatalf("%d distinct events in the topic, want 50", len(seen))
	}
}

// With the disk refusing the spool and Kafka unreachable, a graceful stop
// still ends, within its close timeout, and counts the events it lost.
func TestDiskFullAndKafkaDownCloseEndsAndCountsTheLost(t *testing.T) {
	if os.Getenv(diskFullChild) == "" {
		runDiskFullChild(t, t.Name())
		return
	}
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: []string{"127.0.0.1:1"}, Topic: "usage.unreachable",
		SpoolDir: t.TempDir(), CloseTimeout: 2 * time.Second}, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	edgekafka.FillDisk(t)
	for range 20 {
		p.Emit(edgekafka.UsageEvent("acct_disk_down"))
	}
	time.Sleep(200 * time.Millisecond)
	_ = p.Close()
	if got := testutil.ToFloat64(p.Lost()); got != 20 {
		t.Fatalf("%v events counted lost, want 20", got)
	}
}

// The close timeout bounds the whole graceful stop, however many batches
// are queued: with the disk refusing the spool and Kafka unreachable, Close
// waits for them until its one deadline, then counts every event it could
// not deliver as lost.
func TestDiskFullAndKafkaDownCloseKeepsOneDeadlineForManyBatches(t *testing.T) {
	if os.Getenv(diskFullChild) == "" {
		runDiskFullChild(t, t.Name())
		return
	}
	const closeTimeout = 2 * time.Second
	reg := prometheus.NewRegistry()
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: []string{"127.0.0.1:1"}, Topic: "usage.unreachable",
		SpoolDir: t.TempDir(), BatchSize: 500, CloseTimeout: closeTimeout}, reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	edgekafka.FillDisk(t)
	for range 5000 {
		p.Emit(edgekafka.UsageEvent("acct_disk_down"))
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	_ = p.Close()
	// Not a measure of speed: the margin only absorbs a slow machine,
	// while a deadline per batch (ten batches here) takes several times
	// as long.
	if took := time.Since(start); took > closeTimeout+5*time.Second {
		t.Errorf("Close took %v with a close timeout of %v", took, closeTimeout)
	}
	if lost, delivered := testutil.ToFloat64(p.Lost()), produced(t, reg); lost != 5000-delivered {
		t.Errorf("%v events counted lost and %v delivered, of 5000", lost, delivered)
	}
}

func produced(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather metrics")
	for _, mf := range mfs {
		if mf.GetName() == "tollgate_edge_events_produced_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

// With Kafka out of reach and the disk refusing the spool, the queue fills
// and calls would wait in Emit: the producer says it is backed up (for
// /readyz) once the queue is more than half full, and not before.
func TestDiskFullAndKafkaDownTheProducerIsBackedUp(t *testing.T) {
	if os.Getenv(diskFullChild) == "" {
		runDiskFullChild(t, t.Name())
		return
	}
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: []string{"127.0.0.1:1"}, Topic: "usage.unreachable",
		SpoolDir: t.TempDir(), QueueSize: 100, BatchSize: 10, CloseTimeout: time.Second}, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer p.Close()
	if p.Backed() {
		t.Fatal("backed up before any event")
	}
	edgekafka.FillDisk(t)
	for range 80 {
		p.Emit(edgekafka.UsageEvent("acct_backed"))
	}
	testenv.Wait(t, 5*time.Second, "the producer backed up", p.Backed)
}

// A spool at its bound (spool_max_bytes) refuses more as a full disk
// does: it stays within the bound, the rest wait in memory under the hold,
// and every event reaches Kafka once when it takes them.
func TestASpoolAtItsBoundKeepsTheRestInMemory(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
	t.Cleanup(func() {
		client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	})
	const bound = 64 << 10 // about 150 events
	reg := prometheus.NewRegistry()
	p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: t.TempDir(),
		SpoolMaxBytes: bound, CloseTimeout: 5 * time.Second}, reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new producer")
	defer func() { _ = p.Close() }()
	// The topic does not exist yet, so Kafka refuses every write. Bursts of
	// 100 make batches of about 100, the first few of which fit.
	const n = 500
	for range n / 100 {
		for range 100 {
			p.Emit(edgekafka.UsageEvent("acct_bound"))
		}
		time.Sleep(300 * time.Millisecond)
	}
	testenv.Wait(t, 10*time.Second, "events in the spool", func() bool { return p.SpoolDepth() > 0 })
	time.Sleep(1500 * time.Millisecond) // a refused batch is tried again every second
	size := edgekafka.MetricValue(t, reg, "tollgate_edge_spool_bytes")
	if size <= 0 || size > bound || p.SpoolDepth() >= n {
		t.Fatalf("spool holds %v bytes and %d events; want some, within the bound of %d, and fewer than the %d emitted", size, p.SpoolDepth(), bound, n)
	}
	if h := p.SpoolHold(); h.Since.IsZero() || !h.Released.IsZero() {
		t.Fatalf("hold %+v while events wait; want one held", h)
	}
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
		Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
	testenv.Must(t, err, "create topic")
	testenv.Must(t, res.Errors[topic], "create topic")
	testenv.Wait(t, 30*time.Second, "every event in Kafka", func() bool {
		return p.KafkaUp() && p.SpoolDepth() == 0 && produced(t, reg) == n
	})
	if h := p.SpoolHold(); h.Released.IsZero() || testutil.ToFloat64(p.Lost()) != 0 {
		t.Fatalf("hold %+v, lost %v once every event is in Kafka; want it released and none lost", h, testutil.ToFloat64(p.Lost()))
	}
	testenv.Must(t, p.Close(), "close producer")
	seen := map[string]bool{}
	for _, ev := range edgetest.ReadTopic(t, brokers, topic, n, 30*time.Second) {
		if seen[ev.ID.String()] {
			t.Fatalf("event %s is in the topic twice", ev.ID)
		}
		seen[ev.ID.String()] = true
	}
	if len(seen) != n {
		t.Fatalf("%d distinct events in the topic, want %d", len(seen), n)
	}
}
