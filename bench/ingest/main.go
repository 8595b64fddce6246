// Command ingest benchmarks Tollgate's ingest against the best stock-parts
// pipeline measured in the same run, and measures usage freshness.
//
//  1. Throughput: N events (2,000,000) are produced to a topic up front,
//     enough for each side to run for several seconds: with 200,000, a run
//     lasted under a second and measured start-up, the consumer group's
//     join and the peer's single insert block as much as throughput.
//     Tollgate ingest (effectively once: dedup, dead letters, rollups
//     recomputed before each commit) drains it into ClickHouse; ingest_eps
//     = N / time until every offset is committed, the fastest of -repeat
//     runs (3), each on its own topic, consumer group and accounts, and
//     each starting on empty tables.
//  2. Peer: the same topic into ClickHouse with stock parts and no
//     effectively-once guarantee: ClickHouse's Kafka table engine with a
//     materialized view if it can consume from this broker within a time
//     limit, otherwise kcat piped into clickhouse-client INSERT … FORMAT
//     JSONEachRow with blocks of 65,536 rows (-peer-blocks), into an empty
//     table. peer_eps = N / its wall time, the fastest of its runs. Each
//     round runs ingest and then the peer on the round's topic, so both
//     sides get the same number of runs, interleaved. The shared machine
//     is noisy: a single run of either side varied by a factor of two from
//     one run to the next.
//  3. Freshness: calls go through an edge wired as `tollgate edge` wires
//     one (hashed keys, Redis limits, its producer with its linger and
//     RequireAll) at a steady rate (default 5,000/s), each stamped as it is
//     sent, to a tiny upstream; one poller per account reads the
//     usage API every 100 ms (-poll). An event's freshness is the time from
//     its call to the first usage API answer that counts it, so the poll
//     interval can only add to it (50 ms on average). freshness_p99_ms is
//     the 99th percentile. Polling much faster is itself load: at 20 ms the
//     eight pollers send 400 queries/s to the same ClickHouse.
//  4. CPU: during each throughput run, the CPU time of every process on
//     that side (this process, which hosts ingest; kcat and
//     clickhouse-client for the peer) plus the ClickHouse server's and the
//     Kafka broker's, read from /proc. On a machine whose cores are all
//     busy, throughput follows CPU per event, so cpu_ratio_vs_peer (the
//     peer's CPU per event over ours) says how much of the throughput gap
//     is work rather than waiting.
//  5. A late batch: -backfill-events events (2,500) spread over the last 40
//     days land, with their rollups, on -backfill-base events (100,000)
//     already there, with eight meters over three event types and accounts in
//     three zones: late_batch_ms is the best of -repeat batches. The
//     reference in the same run is rebuilding those rollups for the whole
//     40 days (rebuild_ms); rebuild_vs_late_batch above 1 means a late
//     batch costs less than recomputing everything.
//
// Everything runs on loopback against the local services, in a scratch
// ClickHouse database, Postgres database and topics that are removed after.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tollgate-dev/tollgate/bench/internal/memprof"
	"github.com/tollgate-dev/tollgate/bench/internal/procstat"
	"github.com/tollgate-dev/tollgate/bench/internal/scratch"
	"github.com/tollgate-dev/tollgate/internal/gctune"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

func main() {
	// The same garbage-collector setting as the tollgate command.
	fmt.Printf("GOGC=%d (as tollgate runs; set GOGC to override)\n", gctune.Apply())
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-ingest:", err)
		os.Exit(1)
	}
}

type opts struct {
	events             int
	partitions         int
	accounts           int
	rate               int
	duration           time.Duration
	peerLimit          time.Duration
	workers            int
	coalesce           bool
	batchWait          time.Duration
	batchSize          int
	maxInFlight        int
	maxInFlightRecords int
	poll               time.Duration
	repeat             int
	// peerBlocks are the insert block sizes the kcat peer runs with, each
	// once a round (-peer-blocks; 0 is clickhouse-client's default,
	// max_insert_block_size, 1,048,576 rows). The client parses a whole
	// block before it sends it and waits for the server to write it before
	// it parses on, so with the default the stages take turns; on 2,000,000
	// events a sweep (8,192 to 1,048,576 rows, two runs each) was fastest at
	// 16,384 to 65,536 rows, about 7.0 to 8.4 s against 10.5 s with the
	// default. The default is 65,536 alone, so the peer gets as many runs
	// as ingest does, at its best block size.
	peerBlocks []int
	// backfillBase and backfillEvents size the late-batch measurement.
	backfillBase   int
	backfillEvents int
	cpu            *cpuMeter // nil when the servers' CPU cannot be read
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func run() error {
	var o opts
	flag.IntVar(&o.events, "events", 2_000_000, "events for the throughput runs (enough for several seconds a run, so start-up and the consumer group's join weigh little)")
	flag.IntVar(&o.partitions, "partitions", 4, "usage topic partitions")
	flag.IntVar(&o.accounts, "accounts", 8, "accounts the events belong to")
	flag.IntVar(&o.rate, "rate", 5000, "events per second in the freshness run")
	flag.DurationVar(&o.duration, "duration", 20*time.Second, "length of the freshness run")
	flag.DurationVar(&o.peerLimit, "kafka-engine-limit", 20*time.Second, "how long ClickHouse's Kafka engine may take to show its first rows")
	flag.IntVar(&o.workers, "workers", 4, "ingest workers (consumer group members)")
	flag.DurationVar(&o.batchWait, "batch-wait", 100*time.Millisecond, "ingest.batch_wait")
	flag.IntVar(&o.batchSize, "batch-size", 0, "ingest.batch_size (0: the default)")
	flag.IntVar(&o.maxInFlight, "max-in-flight", 0, "ingest.max_in_flight (0: the default)")
	flag.IntVar(&o.maxInFlightRecords, "max-in-flight-records", 0, "ingest.max_in_flight_records (0: the default)")
	flag.DurationVar(&o.poll, "poll", 100*time.Millisecond, "how often each account's poller asks the usage API in the freshness run")
	flag.IntVar(&o.repeat, "repeat", 3, "throughput runs of each side; the fastest of each is reported")
	flag.IntVar(&o.backfillBase, "backfill-base", 100_000, "events already in the 40 days a late batch lands in")
	flag.IntVar(&o.backfillEvents, "backfill-events", 2_500, "events in each late batch, spread over 40 days")
	flag.BoolVar(&o.coalesce, "coalesce", true, "share raw inserts and rollup rounds between workers (as tollgate ingest does)")
	peerBlocks := flag.String("peer-blocks", "65536", "comma-separated insert block sizes (rows) the kcat | clickhouse-client peer runs with, each once a round; 0 is clickhouse-client's default (1,048,576)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the throughput run (this process: ingest and the rollups) to this file")
	memProfile := flag.String("memprofile", "", "write a heap allocation profile of this process (allocations since it started, the producer's included) after the first throughput run to this file")
	flag.Parse()
	for _, b := range strings.Split(*peerBlocks, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(b))
		if err != nil || n < 0 {
			return fmt.Errorf("-peer-blocks %q: want comma-separated row counts", *peerBlocks)
		}
		o.peerBlocks = append(o.peerBlocks, n)
	}

	ctx := context.Background()
	brokers := strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")
	chAddr := env("TOLLGATE_CLICKHOUSE_ADDR", "127.0.0.1:19000")
	pgURL := env("TOLLGATE_POSTGRES_URL", "postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable")
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	stamp := time.Now().Format("20060102150405")
	name := "bench_ingest_" + stamp

	ch, dropCH, err := scratch.ClickHouse(ctx, chAddr, name)
	if err != nil {
		return err
	}
	defer dropCH()
	pool, dropPG, err := scratch.Postgres(ctx, pgURL, name)
	if err != nil {
		return err
	}
	defer dropPG()

	kc := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	topicB := "bench.ingest." + stamp + ".b"
	var topics []string
	createTopics := func(names ...string) error {
		var cfgs []kafka.TopicConfig
		for _, t := range names {
			cfgs = append(cfgs, kafka.TopicConfig{Topic: t, NumPartitions: o.partitions, ReplicationFactor: 1})
		}
		topics = append(topics, names...)
		if _, err := kc.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: cfgs}); err != nil {
			return fmt.Errorf("create topics (make services): %w", err)
		}
		return nil
	}
	defer func() { _, _ = kc.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: topics}) }()
	o.repeat = max(o.repeat, 1)
	o.cpu = newCPUMeter(chAddr, brokers)

	// 1 and 2. Throughput, in o.repeat rounds: each round lands a new
	// topic with ingest, then the same topic with the peer, so both sides
	// see the machine as busy as each other. Each ingest run has its own
	// topic, consumer group and accounts, so no run's rollups re-read
	// another's events. The machine is shared and noisy, so each side's
	// fastest run counts.
	if err := ch.Exec(ctx, peerTable); err != nil {
		return fmt.Errorf("peer table: %w", err)
	}
	var ingestDur, peerDur time.Duration
	var ingestCPU, peerCPU cpuUse
	peerName, peerRuns := "", 0
	engine := false // whether ClickHouse's Kafka engine is the peer
	for rep := 1; rep <= o.repeat; rep++ {
		topic := fmt.Sprintf("bench.ingest.%s.a%d", stamp, rep)
		if err := createTopics(topic, topic+".dlq"); err != nil {
			return err
		}
		prefix := fmt.Sprintf("acct_r%d_", rep)
		fmt.Printf("run %d: producing %d events to %s (%d partitions)\n", rep, o.events, topic, o.partitions)
		if err := produceBulk(ctx, brokers, topic, o.events, o.accounts, prefix); err != nil {
			return err
		}
		p, err := startIngest(ctx, o, brokers, topic, ch, pool, log)
		if err != nil {
			return err
		}
		if *cpuProfile != "" && rep == 1 {
			f, err := os.Create(*cpuProfile)
			if err != nil {
				return err
			}
			defer f.Close()
			if err := pprof.StartCPUProfile(f); err != nil {
				return err
			}
		}
		c0 := o.cpu.begin()
		f0 := minorFaults()
		t0 := time.Now()
		if err := waitCommitted(ctx, p.reg, brokers, topic, topic+".group", int64(o.events), 5*time.Minute); err != nil {
			p.stop()
			return err
		}
		d := time.Since(t0)
		use := o.cpu.end(c0, "tollgate ingest", 0)
		faults := minorFaults() - f0
		if rep == 1 {
			pprof.StopCPUProfile()
			if *memProfile != "" {
				if err := memprof.WriteAllocs(*memProfile); err != nil {
					return err
				}
			}
		}
		fmt.Println("  ingest steps:", p.summary())
		p.stop()
		var raw uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM usage_events FINAL WHERE startsWith(account_id, ?)", prefix).Scan(&raw); err != nil {
			return err
		}
		fmt.Printf("  tollgate ingest: %d events in %.2fs = %.0f events/s (raw rows %d, rollups recomputed per batch)\n",
			o.events, d.Seconds(), float64(o.events)/d.Seconds(), raw)
		if raw != uint64(o.events) {
			return fmt.Errorf("raw rows %d, want %d", raw, o.events)
		}
		// The rollups ingest recomputed are exact too: the throughput
		// counts only a run whose minute and day rollups add up to every
		// event once.
		for _, g := range []string{"minute", "day"} {
			var sum uint64
			if err := ch.QueryRow(ctx, `SELECT toUInt64(sum(value)) FROM usage_rollups FINAL
                WHERE meter = 'api_calls' AND granularity = ? AND empty(group_values) AND startsWith(account_id, ?)`, g, prefix).Scan(&sum); err != nil {
				return err
			}
			if sum != uint64(o.events) {
				return fmt.Errorf("api_calls %s rollups add up to %d, want %d", g, sum, o.events)
			}
		}
		fmt.Println("  cpu:", use.describe(o.events))
		// Each fresh page this process touches costs a minor fault: a
		// heap that grows for the run (or was given back to the system
		// since the last one) shows here.
		fmt.Printf("  minor page faults in this process: %d (%.3f per event)\n", faults, float64(faults)/float64(o.events))
		if ingestDur == 0 || d < ingestDur {
			ingestDur, ingestCPU = d, use
		}
		// The peer starts each run on an empty table (TRUNCATE), so its
		// runs never pay for an earlier run's background merges. Ingest's
		// tables get the same: without this, the merges of earlier runs'
		// parts ran on into later runs (ingest's and the peer's first)
		// and counted as their CPU.
		for _, t := range []string{"usage_events", "usage_rollups", "late_events", "watermarks", "watermark_source"} {
			if err := ch.Exec(ctx, "TRUNCATE TABLE "+t); err != nil {
				return fmt.Errorf("truncate %s between runs: %w", t, err)
			}
		}

		// The peer, on the same topic. ClickHouse's Kafka engine is tried
		// in the first round; when it works it is the peer, measured in
		// every round as ingest is (best of each).
		if rep == 1 || engine {
			d, use, err := kafkaEngine(ctx, o, ch, brokers, topic)
			switch {
			case err == nil:
				engine = true
				peerRuns++
				if peerDur == 0 || d < peerDur {
					peerName, peerDur, peerCPU = "ClickHouse Kafka engine + materialized view", d, use
				}
				fmt.Printf("  peer: %.2fs; cpu: %s\n", d.Seconds(), use.describe(o.events))
			case engine:
				return fmt.Errorf("ClickHouse Kafka engine, round %d: %w", rep, err)
			default:
				fmt.Printf("ClickHouse Kafka engine: %v; using kcat | clickhouse-client instead\n", err)
			}
		}
		if engine {
			continue
		}
		for _, block := range o.peerBlocks {
			d, use, err := kcatPeer(ctx, o, ch, name, brokers, topic, chAddr, block)
			if err != nil {
				return err
			}
			peerRuns++
			fmt.Printf("  peer, %s: %.2fs; cpu: %s\n", blockName(block), d.Seconds(), use.describe(o.events))
			if peerDur == 0 || d < peerDur {
				peerName, peerDur, peerCPU = "kcat | clickhouse-client FORMAT JSONEachRow, "+blockName(block), d, use
			}
		}
	}
	ingestEPS := float64(o.events) / ingestDur.Seconds()
	fmt.Printf("tollgate ingest: fastest of %d runs %.0f events/s\n", o.repeat, ingestEPS)
	peerEPS := float64(o.events) / peerDur.Seconds()
	fmt.Printf("peer (%s): fastest of %d runs %d events in %.2fs = %.0f events/s (no deduplication, no rollups)\n",
		peerName, peerRuns, o.events, peerDur.Seconds(), peerEPS)

	// 3. Freshness.
	if err := createTopics(topicB, topicB+".dlq"); err != nil {
		return err
	}
	p99, p50, n, err := freshness(ctx, o, brokers, topicB, ch, pool, log)
	if err != nil {
		return err
	}
	fmt.Printf("freshness at %d events/s for %s: %d events, p50 %.0f ms, p99 %.0f ms (each call's time as it was sent to the edge, to the first usage API answer counting it; each account polled every %s)\n",
		o.rate, o.duration, n, p50, p99, o.poll)

	// 4. A late batch spread over 40 days, against rebuilding everything.
	bf, err := backfill(ctx, o, ch, log)
	if err != nil {
		return err
	}
	fmt.Printf("late batch: best of %d %.2fs; rebuilding the same rollups %.2fs (%.1f times the batch)\n",
		o.repeat, bf.batch.Seconds(), bf.rebuild.Seconds(), bf.rebuild.Seconds()/bf.batch.Seconds())

	result := fmt.Sprintf("RESULT ingest_eps=%.0f peer_eps=%.0f ratio_vs_peer=%.2f freshness_p99_ms=%.0f",
		ingestEPS, peerEPS, ingestEPS/peerEPS, p99)
	if ingestCPU.ok && peerCPU.ok {
		ing, peer := ingestCPU.perEvent(o.events), peerCPU.perEvent(o.events)
		fmt.Printf("cpu per event, every process of each side together (the fastest run of each): tollgate %.1f µs, peer %.1f µs\n", ing, peer)
		result += fmt.Sprintf(" ingest_cpu_us_per_event=%.1f peer_cpu_us_per_event=%.1f cpu_ratio_vs_peer=%.2f", ing, peer, peer/ing)
	}
	result += fmt.Sprintf(" late_batch_ms=%.0f rebuild_ms=%.0f rebuild_vs_late_batch=%.1f",
		float64(bf.batch.Microseconds())/1000, float64(bf.rebuild.Microseconds())/1000, bf.rebuild.Seconds()/bf.batch.Seconds())
	fmt.Println(result)
	return nil
}

func event(account string, at time.Time, i int) schemas.Event {
	return schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: account, Environment: schemas.Live,
		KeyID: "key_" + account, Type: "api_call", Time: at.UTC().Truncate(time.Microsecond),
		Route: []string{"/v1/search", "/v1/items", "/v1/orders"}[i%3], Method: "GET", Status: 200,
		LatencyMicros: int64(1000 + i%5000), ResponseBytes: int64(200 + i%3000), Units: 1,
		Dimensions: map[string]string{"region": []string{"eu", "us"}[i%2]}}
}

func writer(brokers []string, topic string) *kafka.Writer {
	return &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{},
		RequiredAcks: kafka.RequireAll, BatchSize: 2000, BatchTimeout: 5 * time.Millisecond, BatchBytes: 16 << 20}
}

func produceBulk(ctx context.Context, brokers []string, topic string, n, accounts int, prefix string) error {
	w := writer(brokers, topic)
	defer w.Close()
	now := time.Now()
	const chunk = 10_000
	for i := 0; i < n; i += chunk {
		msgs := make([]kafka.Message, 0, chunk)
		for j := i; j < min(i+chunk, n); j++ {
			acct := fmt.Sprintf("%s%d", prefix, j%accounts)
			e := event(acct, now.Add(-time.Duration(n-j)*time.Millisecond), j)
			b, err := e.Encode()
			if err != nil {
				return err
			}
			msgs = append(msgs, kafka.Message{Key: []byte(acct), Value: b})
		}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			return fmt.Errorf("produce: %w", err)
		}
	}
	return nil
}

type pipeline struct {
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan struct{}
	close  func()
}

// summary prints the mean batch size and landing step latencies.
func (p *pipeline) summary() string {
	mfs, _ := p.reg.Gather()
	var parts []string
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if h := m.GetHistogram(); h != nil && h.GetSampleCount() > 0 {
				parts = append(parts, fmt.Sprintf("%s mean %.3f (n=%d)", strings.TrimPrefix(mf.GetName(), "tollgate_ingest_"),
					h.GetSampleSum()/float64(h.GetSampleCount()), h.GetSampleCount()))
			}
		}
	}
	return strings.Join(parts, ", ")
}

func (p *pipeline) stop() {
	p.cancel()
	<-p.done
	p.close()
}

// startIngest wires ingest as `tollgate ingest` does: workers, dead
// letters, rollups through the aggregator's Roller, watermarks.
func startIngest(ctx context.Context, o opts, brokers []string, topic string, ch driver.Conn, pool *pgxpool.Pool, log *slog.Logger) (*pipeline, error) {
	cfg := ingest.Config{Topic: topic, DeadLetter: topic + ".dlq", Group: topic + ".group", Workers: o.workers,
		BatchWait: o.batchWait, BatchSize: o.batchSize, MaxInFlight: o.maxInFlight,
		MaxInFlightRecords: o.maxInFlightRecords}
	cfg.Defaults()
	catalog, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, aggpg.NewMeters(pool), 5*time.Second, log)
	if err != nil {
		return nil, err
	}
	var roller ingest.Rollups = aggregator.NewRoller(catalog, aggpg.NewZones(pool, time.Minute, log), aggch.NewStore(ch), log)
	var closers []io.Closer
	if o.coalesce {
		c := aggregator.NewCoalescer(roller.(*aggregator.Roller))
		roller, closers = c, append(closers, c)
	}
	var srcs []ingest.Source
	for range o.workers {
		s := ingestkafka.NewSource(brokers, kafkaconn.Security{}, topic, cfg.Group)
		srcs = append(srcs, s)
		closers = append(closers, s)
	}
	dlq := ingestkafka.NewDeadLetters(brokers, kafkaconn.Security{}, cfg.DeadLetter, topic)
	closers = append(closers, dlq)
	var sink ingest.Sink = chsink.NewSink(ch)
	if o.coalesce {
		ss := ingest.NewSharedSink(sink)
		sink, closers = ss, append(closers, ss)
	}
	prog := ingest.NewProgress()
	reg := prometheus.NewRegistry()
	in, err := ingest.New(cfg, ingest.Deps{Sources: srcs, Sink: sink, DeadLetters: dlq, Rollups: roller, Log: log, Progress: prog, Registry: reg})
	if err != nil {
		return nil, err
	}
	wm, err := ingest.NewWatermarker(cfg, ingestkafka.NewOffsets(brokers, kafkaconn.Security{}, topic, cfg.Group), chsink.NewSink(ch), prog, log, nil)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = wm.Run(rctx) }()
	go func() {
		defer close(done)
		if err := in.Run(rctx); err != nil {
			log.Error("ingest stopped", "err", err)
		}
	}()
	return &pipeline{cancel: cancel, done: done, reg: reg, close: func() {
		for _, c := range closers {
			_ = c.Close()
		}
	}}, nil
}

// waitCommitted returns once the group has committed offsets past n
// records of topic. Ingest counts a batch's records (by outcome) only after
// committing its offsets, so the wait watches those counters in this
// process every 5 ms, and then asks Kafka once for the committed offsets to
// confirm. Asking Kafka instead every 20 ms, as the bench did before, cost
// the broker about half a second of CPU per 8 s (a metadata, a list-offsets
// and an offset-fetch request each time), on the side being measured; the
// peer's end is its process exiting, which costs nothing.
func waitCommitted(ctx context.Context, reg prometheus.Gatherer, brokers []string, topic, group string, n int64, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for counted(reg, "tollgate_ingest_records_total") < float64(n) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: ingest counted %.0f of %d records after %s", topic, counted(reg, "tollgate_ingest_records_total"), n, limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
	offs := ingestkafka.NewOffsets(brokers, kafkaconn.Security{}, topic, group)
	for {
		m, err := offs.Offsets(ctx)
		if err != nil {
			return fmt.Errorf("%s: committed offsets: %w", topic, err)
		}
		var sum int64
		for _, o := range m {
			if o.Committed > 0 {
				sum += o.Committed
			}
		}
		if sum >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %d of %d offsets committed after %s, though ingest counted them all", topic, sum, n, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// counted sums every series of the counter family name in reg.
func counted(reg prometheus.Gatherer, name string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return 0
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// peerColumns are the event's scalar JSON fields; JSONEachRow maps them by
// name and skips the rest (the dimensions object).
const peerTable = `CREATE TABLE peer_events (v UInt8, id UUID, account_id String, env String, key_id String,
 type String, time String, route String, method String, status UInt16, latency_us UInt64,
 request_bytes UInt64, response_bytes UInt64, units Int64) ENGINE = MergeTree ORDER BY (account_id, id)`

func blockName(rows int) string {
	if rows == 0 {
		return "default blocks"
	}
	return fmt.Sprintf("blocks of %d rows", rows)
}

// kcatPeer runs kcat piped into clickhouse-client once, into an empty
// peer_events.
func kcatPeer(ctx context.Context, o opts, ch driver.Conn, db string, brokers []string, topic, chAddr string, block int) (time.Duration, cpuUse, error) {
	if err := ch.Exec(ctx, "TRUNCATE TABLE peer_events"); err != nil {
		return 0, cpuUse{}, err
	}
	host, port, _ := net.SplitHostPort(chAddr)
	c0 := o.cpu.begin()
	t0 := time.Now()
	// fetch.wait.max.ms=10: librdkafka's default (500 ms) has the broker
	// hold each fetch at the end of a partition, which kcat -e waits out;
	// with it the peer spent half a second idle and looked half as fast.
	kcat := exec.CommandContext(ctx, "kcat", "-C", "-b", strings.Join(brokers, ","), "-t", topic, "-o", "beginning", "-e", "-q",
		"-X", "fetch.wait.max.ms=10", "-f", "%s\n")
	args := []string{"--host", host, "--port", port, "-d", db, "--input_format_skip_unknown_fields=1"}
	if block > 0 {
		args = append(args, fmt.Sprintf("--max_insert_block_size=%d", block))
	}
	client := exec.CommandContext(ctx, "clickhouse-client", append(args,
		"-q", "INSERT INTO peer_events (v, id, account_id, env, key_id, type, time, route, method, status, latency_us, request_bytes, response_bytes, units) FORMAT JSONEachRow")...)
	// A plain OS pipe joins the two processes directly, as a shell would.
	r, w, err := os.Pipe()
	if err != nil {
		return 0, cpuUse{}, err
	}
	kcat.Stdout, client.Stdin = w, r
	var kcatErr, clientErr strings.Builder
	kcat.Stderr, client.Stderr = &kcatErr, &clientErr
	if err := client.Start(); err != nil {
		r.Close()
		w.Close()
		return 0, cpuUse{}, fmt.Errorf("clickhouse-client: %w", err)
	}
	r.Close()
	err = kcat.Run()
	w.Close() // clickhouse-client sees the end of its input
	if err != nil {
		_ = client.Process.Kill()
		_ = client.Wait()
		return 0, cpuUse{}, fmt.Errorf("kcat: %w: %s", err, kcatErr.String())
	}
	if err := client.Wait(); err != nil {
		return 0, cpuUse{}, fmt.Errorf("clickhouse-client: %w: %s", err, clientErr.String())
	}
	d := time.Since(t0)
	use := o.cpu.end(c0, "", childCPU(kcat)+childCPU(client))
	var n uint64
	if err := ch.QueryRow(ctx, "SELECT count() FROM peer_events").Scan(&n); err != nil {
		return 0, cpuUse{}, err
	}
	if n != uint64(o.events) {
		return 0, cpuUse{}, fmt.Errorf("peer landed %d rows, want %d", n, o.events)
	}
	return d, use, nil
}

// kafkaEngine tries ClickHouse's own Kafka consumer. Its librdkafka is old;
// if it shows no rows within the limit it is dropped.
func kafkaEngine(ctx context.Context, o opts, ch driver.Conn, brokers []string, topic string) (time.Duration, cpuUse, error) {
	q := fmt.Sprintf(`CREATE TABLE peer_queue (v UInt8, id UUID, account_id String, env String, key_id String,
 type String, time String, route String, method String, status UInt16, latency_us UInt64,
 request_bytes UInt64, response_bytes UInt64, units Int64)
 ENGINE = Kafka('%s', '%s', '%s', 'JSONEachRow')`, strings.Join(brokers, ","), topic, topic+".peer")
	// Each run counts its own rows: left from the round before, they met
	// the count at the first look.
	if err := ch.Exec(ctx, "TRUNCATE TABLE peer_events"); err != nil {
		return 0, cpuUse{}, fmt.Errorf("empty peer_events: %w", err)
	}
	c0 := o.cpu.begin()
	t0 := time.Now()
	if err := ch.Exec(ctx, q); err != nil {
		return 0, cpuUse{}, fmt.Errorf("create Kafka engine table: %w", err)
	}
	if err := ch.Exec(ctx, `CREATE MATERIALIZED VIEW peer_mv TO peer_events AS SELECT * FROM peer_queue`); err != nil {
		_ = ch.Exec(ctx, "DROP TABLE peer_queue")
		return 0, cpuUse{}, fmt.Errorf("create materialized view: %w", err)
	}
	defer func() {
		_ = ch.Exec(context.Background(), "DROP TABLE IF EXISTS peer_mv")
		_ = ch.Exec(context.Background(), "DROP TABLE IF EXISTS peer_queue")
	}()
	deadline := t0.Add(o.peerLimit)
	for {
		var n uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM peer_events").Scan(&n); err != nil {
			return 0, cpuUse{}, err
		}
		if n >= uint64(o.events) {
			return time.Since(t0), o.cpu.end(c0, "", 0), nil
		}
		if n == 0 && time.Now().After(deadline) {
			return 0, cpuUse{}, fmt.Errorf("no rows after %s (its librdkafka cannot talk to this broker)", o.peerLimit)
		}
		if time.Since(t0) > 5*time.Minute {
			return 0, cpuUse{}, fmt.Errorf("only %d of %d rows after 5 minutes", n, o.events)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freshness runs ingest and the usage API on topic, produces at o.rate and
// reports p99 and p50 of call-to-visible latency in milliseconds.

func freshness(ctx context.Context, o opts, brokers []string, topic string, ch driver.Conn, pool *pgxpool.Pool, log *slog.Logger) (p99, p50 float64, n int, err error) {
	keys := edgepg.NewKeyStore(pool)
	accounts := make([]string, o.accounts)
	for i := range accounts {
		accounts[i] = fmt.Sprintf("fresh_%d", i)
	}
	fe, secrets, err := startFreshEdge(ctx, pool, brokers, topic, accounts, log)
	if err != nil {
		return 0, 0, 0, err
	}
	defer fe.stop()
	p, err := startIngest(ctx, o, brokers, topic, ch, pool, log)
	if err != nil {
		return 0, 0, 0, err
	}
	defer func() { fmt.Println("  ingest steps:", p.summary()); p.stop() }()
	catalog, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, nil, time.Minute, log)
	if err != nil {
		return 0, 0, 0, err
	}
	srv, err := aggregator.NewServer(aggregator.Config{}, aggregator.ServerDeps{Keys: keys, Usage: aggch.NewStore(ch),
		Catalog: catalog, Zones: aggpg.NewZones(pool, time.Minute, log), Log: log})
	if err != nil {
		return 0, 0, 0, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, 0, err
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(ln) }()
	defer hs.Close()
	base := "http://" + ln.Addr().String()

	start := time.Now().UTC()
	// calls[i] are account i's call times, in the order produced (one
	// account's events share a partition, so they land in this order).
	calls := make([][]time.Time, o.accounts)
	seenAt := make([][]time.Time, o.accounts)
	// most[i] is the largest count the usage API gave account i: more than
	// its events would be a double count, which would also stamp every
	// event early and flatter the figure.
	most := make([]int64, o.accounts)
	var mu sync.Mutex
	stopPoll := make(chan struct{})
	var wg sync.WaitGroup
	for i := range o.accounts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Timeout: 5 * time.Second}
			url := fmt.Sprintf("%s/v1/usage?meter=api_calls&window=hour&from=%s", base, start.Add(-2*time.Hour).Format(time.RFC3339))
			for {
				select {
				case <-stopPoll:
					return
				default:
				}
				to := time.Now().UTC().Add(2 * time.Hour).Format(time.RFC3339)
				req, _ := http.NewRequest(http.MethodGet, url+"&to="+to, nil)
				req.Header.Set("Authorization", "Bearer "+secrets[i])
				resp, err := client.Do(req)
				at := time.Now()
				if err == nil {
					var body struct {
						Data []struct{ Value int64 } `json:"data"`
					}
					derr := json.NewDecoder(resp.Body).Decode(&body)
					resp.Body.Close()
					if derr == nil {
						var c int64
						for _, d := range body.Data {
							c += d.Value
						}
						mu.Lock()
						most[i] = max(most[i], c)
						for int64(len(seenAt[i])) < c {
							seenAt[i] = append(seenAt[i], at)
						}
						mu.Unlock()
					}
				}
				time.Sleep(o.poll)
			}
		}()
	}

	// Calls through the edge at o.rate, from a pool of kept-alive
	// connections; each call's time is taken as it is sent.
	total := int(float64(o.rate) * o.duration.Seconds())
	work := make(chan int, 4096)
	var failed atomic.Int64
	var cwg sync.WaitGroup
	for range 64 {
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			for seq := range work {
				i := seq % o.accounts
				req, _ := http.NewRequest(http.MethodGet, "http://"+fe.addr+"/v1/fresh/"+strconv.Itoa(seq), nil)
				req.Header.Set("Authorization", "Bearer "+secrets[i])
				mu.Lock()
				calls[i] = append(calls[i], time.Now())
				mu.Unlock()
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
			}
		}()
	}
	tick := 10 * time.Millisecond
	perTick := max(1, o.rate/int(time.Second/tick))
	t := time.NewTicker(tick)
	for sent := 0; sent < total; {
		<-t.C
		for j := 0; j < perTick && sent < total; j++ {
			work <- sent
			sent++
		}
	}
	t.Stop()
	close(work)
	cwg.Wait()
	if n := failed.Load(); n > 0 {
		close(stopPoll)
		wg.Wait()
		return 0, 0, 0, fmt.Errorf("freshness: %d of %d calls through the edge failed", n, total)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		mu.Lock()
		done := true
		for i := range calls {
			if len(seenAt[i]) < len(calls[i]) {
				done = false
			}
		}
		mu.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) {
			close(stopPoll)
			wg.Wait()
			return 0, 0, 0, errors.New("freshness: not every event became visible within 2 minutes")
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stopPoll)
	wg.Wait()
	for i := range calls {
		if most[i] != int64(len(calls[i])) {
			return 0, 0, 0, fmt.Errorf("freshness: the usage API counted up to %d events of fresh_%d, which had %d", most[i], i, len(calls[i]))
		}
	}
	// The k-th call of an account is set against the k-th event of it the
	// usage API counted: calls sent at once may land in either order.
	var lat []float64
	for i := range calls {
		slices.SortFunc(calls[i], func(a, b time.Time) int { return a.Compare(b) })
		for j, c := range calls[i] {
			lat = append(lat, float64(seenAt[i][j].Sub(c).Microseconds())/1000)
		}
	}
	slices.Sort(lat)
	pct := func(q float64) float64 { return lat[min(len(lat)-1, int(q*float64(len(lat))))] }
	return pct(0.99), pct(0.50), len(lat), nil
}

// cpuMeter samples the CPU time of the ClickHouse server and the Kafka
// broker, which both sides share, and of this process. Neither side's
// figure includes background work that outlasts its run (ClickHouse's
// merges of the parts it wrote), so both are a little low in the same way.
type cpuMeter struct{ servers procstat.Meter }

func newCPUMeter(chAddr string, brokers []string) *cpuMeter {
	var m cpuMeter
	if len(brokers) > 1 {
		fmt.Println("cpu per event not measured: more than one Kafka broker")
		return nil
	}
	for _, s := range []struct{ name, addr string }{{"clickhouse", chAddr}, {"kafka", brokers[0]}} {
		if err := m.servers.Watch(s.name, s.addr); err != nil {
			fmt.Printf("cpu per event not measured: %v\n", err)
			return nil
		}
	}
	return &m
}

// cpuUse is the CPU time every process of one side used during one run.
type cpuUse struct {
	ok    bool
	parts []string
	total time.Duration
}

func (m *cpuMeter) begin() procstat.Span {
	if m == nil {
		return procstat.Span{}
	}
	return m.servers.Begin()
}

// end is the CPU used since s: this process's under selfName (or not at
// all when selfName is empty: it only polled), each server's, and the
// children's (the peer's own processes).
func (m *cpuMeter) end(s procstat.Span, selfName string, children time.Duration) cpuUse {
	if m == nil {
		return cpuUse{}
	}
	u := cpuUse{ok: true}
	add := func(name string, d time.Duration) {
		u.parts = append(u.parts, fmt.Sprintf("%s %.2fs", name, d.Seconds()))
		u.total += d
	}
	self, servers := s.End()
	if selfName != "" {
		add(selfName, self)
	}
	if children > 0 {
		add("kcat + clickhouse-client", children)
	}
	for _, o := range servers {
		add(o.Name, o.CPU)
	}
	return u
}

func (u cpuUse) perEvent(n int) float64 { return float64(u.total.Microseconds()) / float64(n) }

func (u cpuUse) describe(n int) string {
	if !u.ok {
		return "not measured"
	}
	return fmt.Sprintf("%s = %.2fs (%.1f µs per event)", strings.Join(u.parts, " + "), u.total.Seconds(), u.perEvent(n))
}

// childCPU is the user plus system time of a finished child process.
func childCPU(c *exec.Cmd) time.Duration {
	if c.ProcessState == nil {
		return 0
	}
	return c.ProcessState.UserTime() + c.ProcessState.SystemTime()
}

// minorFaults is how many minor page faults this process has taken.
func minorFaults() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Minflt
}
