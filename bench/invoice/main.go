// Command invoice benchmarks closing a billing period: 1,000 accounts over
// at least 10 million raw events generated straight into a scratch
// ClickHouse database, against a floor measured in the same run: one plain
// ClickHouse aggregate grouped by account over the same rows, computing
// what the invoices bill (live events and the api_calls quantity), with no
// deduplication and no ledger. The cheapest aggregate (count() per
// account) is reported too, as count_floor_s.
// It also measures replay (Kafka topic → scratch database) on a smaller
// sample topic. Everything it creates is dropped at the end.
//
// The last line is: RESULT invoice_run_s=… floor_query_s=… ratio_vs_floor=… replay_eps=…
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/tollgate-dev/tollgate/bench/internal/scratch"
	"github.com/tollgate-dev/tollgate/internal/gctune"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/invoicer"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	"github.com/tollgate-dev/tollgate/schemas"
)

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func main() {
	// The same garbage-collector setting as the tollgate command.
	fmt.Printf("GOGC=%d (as tollgate runs; set GOGC to override)\n", gctune.Apply())
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-invoice:", err)
		os.Exit(1)
	}
}

func run() error {
	accounts := flag.Int("accounts", 1000, "accounts")
	events := flag.Int("events", 10_000_000, "raw events")
	replayEvents := flag.Int("replay-events", 200_000, "events in the replay sample topic")
	floorRuns := flag.Int("runs", 3, "runs of the floor query and of the merged close (the fastest of each counts)")
	flag.Parse()
	if *floorRuns < 1 {
		return fmt.Errorf("-runs %d: want 1 or more", *floorRuns)
	}
	pgURL := env("TOLLGATE_POSTGRES_URL", "postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable")
	chAddr := env("TOLLGATE_CLICKHOUSE_ADDR", "127.0.0.1:19000")
	brokers := strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")
	ctx := context.Background()
	name := fmt.Sprintf("bench_invoice_%d", time.Now().Unix())

	ch, dropCH, err := scratch.ClickHouse(ctx, chAddr, name)
	if err != nil {
		return err
	}
	defer dropCH()

	// Two scratch Postgres databases: one ledger per close.
	pool, dropPG, err := scratch.Postgres(ctx, pgURL, name)
	if err != nil {
		return err
	}
	defer dropPG()
	// The merged close runs as often as the floor, each into a fresh
	// ledger, and the fastest counts, as for the floor.
	merged := make([]*pgxpool.Pool, *floorRuns)
	for i := range merged {
		p, drop, err := scratch.Postgres(ctx, pgURL, fmt.Sprintf("%s_m%d", name, i))
		if err != nil {
			return err
		}
		defer drop()
		merged[i] = p
	}

	period := invoicer.Period{Start: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)}
	for _, p := range append([]*pgxpool.Pool{pool}, merged...) {
		if err := seedAccounts(ctx, p, *accounts, period.Start); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "generating %d events for %d accounts in %s…\n", *events, *accounts, name)
	t0 := time.Now()
	if err := generate(ctx, ch, *events, *accounts, period); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "generated in %.1fs\n", time.Since(t0).Seconds())
	wb, err := ch.PrepareBatch(ctx, "INSERT INTO watermarks (partition, watermark, updated_at)")
	if err != nil {
		return err
	}
	if err := wb.Append(int32(0), period.End.Add(2*time.Hour), time.Now().UTC()); err != nil {
		return err
	}
	if err := wb.Send(); err != nil {
		return err
	}

	// The floor is the aggregate the close itself needs, as one plain
	// query: per account, the live events and the default meter's quantity
	// over the period's rows, with no deduplication, no plan or ledger work.
	// The cheapest aggregate of all (count() per account) is measured too,
	// for context.
	// Each floor is measured on the parts the close it is set against reads:
	// unmerged, then merged.
	type floorBest struct{ billable, count time.Duration }
	newBest := func() *floorBest { return &floorBest{1<<63 - 1, 1<<63 - 1} }
	floorQueries := []struct {
		name     string
		sql      string
		billable bool
	}{
		{"billable quantities", `SELECT account_id, count(), countIf(event_type = 'api_call') FROM usage_events
			WHERE environment = 'live' AND timestamp >= toDateTime(?) AND timestamp < toDateTime(?) GROUP BY account_id`, true},
		{"count only", `SELECT account_id, count() FROM usage_events
			WHERE timestamp >= toDateTime(?) AND timestamp < toDateTime(?) GROUP BY account_id`, false},
	}
	// quantities are the floor's api_calls per account: each close's
	// invoices must bill exactly these (no event is inserted twice), or a
	// close that read less would pass for a faster one.
	quantities := map[string]int64{}
	floor := func(label string, b *floorBest) error {
		for i := 0; i < *floorRuns; i++ {
			for _, fq := range floorQueries {
				t := time.Now()
				rows, err := ch.Query(ctx, fq.sql, uint32(period.Start.Unix()), uint32(period.End.Unix()))
				if err != nil {
					return fmt.Errorf("floor query: %w", err)
				}
				n := 0
				for rows.Next() {
					n++
					if fq.billable {
						var acct string
						var all, calls uint64
						if err := rows.Scan(&acct, &all, &calls); err != nil {
							rows.Close()
							return fmt.Errorf("floor query: %w", err)
						}
						quantities[acct] = int64(calls)
					}
				}
				rows.Close()
				d := time.Since(t)
				// Every 20th event is test mode: with 1,000 accounts, accounts
				// 0, 20, 40, … have only test-mode events.
				if want := *accounts - (*accounts+19)/20; fq.billable && n != want || !fq.billable && n != *accounts {
					return fmt.Errorf("floor query %q saw %d accounts", fq.name, n)
				}
				if fq.billable {
					b.billable = min(b.billable, d)
				} else {
					b.count = min(b.count, d)
				}
				fmt.Fprintf(os.Stderr, "floor, %s (%s) run %d: %.3fs\n", fq.name, label, i+1, d.Seconds())
			}
		}
		return nil
	}
	closePeriod := func(p *pgxpool.Pool, label string) (time.Duration, []invoicer.Invoice, error) {
		usage := invch.New(ch)
		iv, err := invoicer.New(invpg.New(p), usage, usage, nil, invoicer.Options{Grace: time.Hour, Lookback: 1,
			Now: func() time.Time { return period.End.Add(72 * time.Hour) }}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
		if err != nil {
			return 0, nil, err
		}
		t := time.Now()
		res, err := iv.CloseDue(ctx)
		d := time.Since(t)
		if err != nil {
			return 0, nil, fmt.Errorf("close period: %w", err)
		}
		if len(res.Closed) != *accounts {
			return 0, nil, fmt.Errorf("closed %d invoices, want %d", len(res.Closed), *accounts)
		}
		var billed, total int64
		for _, inv := range res.Closed {
			q := inv.Fingerprint.Segments[0].Quantities["api_calls"]
			if q != quantities[inv.AccountID] {
				return 0, nil, fmt.Errorf("invoice %s bills %d api_calls, the floor query counts %d for %s", inv.ID, q, quantities[inv.AccountID], inv.AccountID)
			}
			billed += q
			total += inv.Total
		}
		fmt.Fprintf(os.Stderr, "close (%s): %d invoices in %.3fs: %d billable calls, %s usd in total\n",
			label, len(res.Closed), d.Seconds(), billed, invoicer.FormatMinor(total, "usd"))
		return d, res.Closed, nil
	}

	unmergedFloor, mergedFloor := newBest(), newBest()
	if err := floor("unmerged parts", unmergedFloor); err != nil {
		return err
	}
	unmerged, first, err := closePeriod(pool, "unmerged parts, FINAL")
	if err != nil {
		return err
	}
	// A closed month stops receiving inserts and ClickHouse merges its
	// partition; OPTIMIZE … FINAL gets there now instead of eventually.
	tm := time.Now()
	if err := ch.Exec(ctx, "OPTIMIZE TABLE usage_events FINAL"); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "merged the partitions in %.1fs (not timed as part of the close)\n", time.Since(tm).Seconds())
	if err := floor("merged", mergedFloor); err != nil {
		return err
	}
	best, bestCount := mergedFloor.billable, mergedFloor.count
	run := time.Duration(1<<63 - 1)
	var second []invoicer.Invoice
	for i, p := range merged {
		d, invs, err := closePeriod(p, fmt.Sprintf("merged partition, run %d", i+1))
		if err != nil {
			return err
		}
		run, second = min(run, d), invs
	}
	for i := range first {
		if first[i].Fingerprint.Hash != second[i].Fingerprint.Hash {
			return fmt.Errorf("invoice %s differs between the FINAL and the merged read", first[i].ID)
		}
	}
	fmt.Fprintln(os.Stderr, "both closes produced identical invoices (same fingerprint hashes)")
	res := struct{ Closed []invoicer.Invoice }{second}

	eps, err := replayRate(ctx, brokers, pgURL, pool, name, chAddr, *replayEvents)
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	fmt.Printf("accounts=%d events=%d invoices=%d\n", *accounts, *events, len(res.Closed))
	fmt.Printf("unmerged: invoice_run_s=%.3f floor_query_s=%.3f ratio_vs_floor=%.2f (FINAL read, ClickHouse 18.16 runs it single-threaded)\n",
		unmerged.Seconds(), unmergedFloor.billable.Seconds(), unmerged.Seconds()/unmergedFloor.billable.Seconds())
	fmt.Printf("count-only floor: %.3fs, invoice run / count-only floor = %.2f\n", bestCount.Seconds(), run.Seconds()/bestCount.Seconds())
	fmt.Printf("RESULT invoice_run_s=%.3f floor_query_s=%.3f ratio_vs_floor=%.2f replay_eps=%.0f unmerged_invoice_run_s=%.3f unmerged_ratio_vs_floor=%.2f count_floor_s=%.3f ratio_vs_count_floor=%.2f\n",
		run.Seconds(), best.Seconds(), run.Seconds()/best.Seconds(), eps, unmerged.Seconds(), unmerged.Seconds()/unmergedFloor.billable.Seconds(),
		bestCount.Seconds(), run.Seconds()/bestCount.Seconds())
	return nil
}

// seedAccounts spreads accounts over the four seeded plans.
func seedAccounts(ctx context.Context, pool *pgxpool.Pool, n int, start time.Time) error {
	plans := []string{"free", "starter", "growth", "enterprise"}
	b := &pgx.Batch{}
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("acct_%d", i)
		b.Queue(`INSERT INTO accounts (id, name, created_at) VALUES ($1, $1, $2)`, id, start.AddDate(0, -1, 0))
		if p := plans[i%len(plans)]; p != "free" {
			b.Queue(`INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at) VALUES ($1, $2, $3, 1, $4)`,
				"sub_"+id, id, p, start.AddDate(0, -1, 0))
		}
	}
	return pool.SendBatch(ctx, b).Close()
}

// generate inserts events with INSERT … SELECT FROM numbers(): every 20th
// event is test mode and every 10th is another event type, spread over the
// period (and the day after it, which the period must not count).
func generate(ctx context.Context, ch driver.Conn, events, accounts int, p invoicer.Period) error {
	const chunk = 2_000_000
	secs := p.Seconds() + 86400
	for off := 0; off < events; off += chunk {
		n := min(chunk, events-off)
		q := fmt.Sprintf(`INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id, event_type,
			timestamp, timestamp_us, route, method, status, latency_us, request_bytes, response_bytes, units,
			request_id, client_id, dim_keys, dim_values, kafka_partition, kafka_offset, ingested_at)
			SELECT generateUUIDv4(), 1, concat('acct_', toString(number %% %d)),
			  if(number %% 20 = 0, 'test', 'live'), 'key_bench', if(number %% 10 = 7, 'report.generated', 'api_call'),
			  toDateTime(%d + intDiv(number * 7919, 1) %% %d) AS ts, toUInt64(ts) * 1000000, '/v1/items', 'GET', 200, 1000, 0, 512, 1,
			  '', '', [], [], toInt32(number %% 4), toInt64(number), now()
			FROM numbers(%d, %d)`, accounts, p.Start.Unix(), secs, off, n)
		if err := ch.Exec(ctx, q); err != nil {
			return fmt.Errorf("generate events: %w", err)
		}
	}
	return nil
}

// replayRate produces a sample topic and times `tollgate invoice replay`
// loading it into a scratch database (the command's own load timer).
func replayRate(ctx context.Context, brokers []string, pgURL string, pool *pgxpool.Pool, name, chAddr string, n int) (float64, error) {
	topic := strings.ReplaceAll(name, "_", ".") + ".usage"
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	if _, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 4, ReplicationFactor: 1}}}); err != nil {
		return 0, err
	}
	defer func() {
		_, _ = client.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	}()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{}, RequiredAcks: kafka.RequireAll,
		BatchSize: 5000, BatchTimeout: 5 * time.Millisecond}
	now := time.Now().UTC()
	batch := make([]kafka.Message, 0, 5000)
	for i := 0; i < n; i++ {
		ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: fmt.Sprintf("acct_%d", i%1000), Environment: schemas.Live,
			KeyID: "key_bench", Type: "api_call", Time: now.Add(-time.Duration(i) * time.Millisecond), Units: 1, Route: "/v1/items", Method: "GET", Status: 200}
		b, err := ev.Encode()
		if err != nil {
			return 0, err
		}
		batch = append(batch, kafka.Message{Key: []byte(ev.AccountID), Value: b})
		if len(batch) == cap(batch) || i == n-1 {
			if err := w.WriteMessages(ctx, batch...); err != nil {
				return 0, fmt.Errorf("produce sample: %w", err)
			}
			batch = batch[:0]
		}
	}
	if err := w.Close(); err != nil {
		return 0, err
	}
	dir, err := os.MkdirTemp("", "bench-invoice")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "tollgate")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/tollgate").CombinedOutput(); err != nil {
		return 0, fmt.Errorf("build: %v: %s", err, out)
	}
	dbURL, err := scratch.URL(pgURL, name)
	if err != nil {
		return 0, err
	}
	report := filepath.Join(dir, "replay.json")
	// No invoice has a period in 2000: this times the load alone.
	cmd := exec.Command(bin, "invoice", "replay", "--from", "2000-01-01T00:00:00Z", "--to", "2000-01-02T00:00:00Z",
		"--report-json", report, "--report-csv", filepath.Join(dir, "replay.csv"), "--log-level", "warn")
	cmd.Env = append(os.Environ(), "TOLLGATE_POSTGRES_URL="+dbURL, "TOLLGATE_CLICKHOUSE_ADDR="+chAddr,
		"TOLLGATE_KAFKA_BROKERS="+strings.Join(brokers, ","), "TOLLGATE_CONFIG=")
	cfgFile := filepath.Join(dir, "tollgate.yaml")
	if err := os.WriteFile(cfgFile, []byte(fmt.Sprintf("ingest:\n  topic: %s\n  group: %s.g\n", topic, topic)), 0o600); err != nil {
		return 0, err
	}
	cmd.Args = append(cmd.Args, "--config", cfgFile)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("tollgate invoice replay: %w", err)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		return 0, err
	}
	var rep struct {
		EventsLoaded int64   `json:"events_loaded"`
		LoadSeconds  float64 `json:"load_seconds"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return 0, err
	}
	if rep.EventsLoaded != int64(n) {
		return 0, fmt.Errorf("replay loaded %d events, want %d", rep.EventsLoaded, n)
	}
	fmt.Fprintf(os.Stderr, "replay loaded %d events in %.2fs (sample topic; the full bench set is generated in ClickHouse, not Kafka)\n", rep.EventsLoaded, rep.LoadSeconds)
	return float64(rep.EventsLoaded) / rep.LoadSeconds, nil
}
