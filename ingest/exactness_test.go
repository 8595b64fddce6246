package ingest_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/aggregatortest"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// exactMeters are the meters the exactness test checks, one per aggregation.
var exactMeters = []meter.Meter{
	meter.Default(),
	{Key: "units", EventType: "api_call", Aggregation: meter.Sum, Value: "units", GroupBy: []string{"route"}},
	{Key: "users", EventType: "api_call", Aggregation: meter.UniqueCount, Value: "dimensions.user"},
	{Key: "peak_bytes", EventType: "api_call", Aggregation: meter.Max, Value: "response_bytes", GroupBy: []string{"status"}},
	{Key: "balance", EventType: "api_call", Aggregation: meter.Latest, Value: "dimensions.balance"},
}

var exactZones = map[string]string{"acct_03": "Asia/Tokyo", "acct_05": "America/New_York", "acct_07": "Asia/Kolkata"}

type generated struct {
	records   []kafka.Message   // in production order, duplicates included
	timely    []schemas.Event   // distinct valid events within the lateness
	tooLate   []schemas.Event   // distinct valid events beyond it
	malformed map[string]int    // bytes -> copies produced (always 1)
	byID      map[string][]byte // event id -> bytes, to produce duplicates
}

// generate builds n records: valid events (some late within the allowed
// lateness, a few beyond it), 1 % malformed records and 5 % duplicates of
// earlier valid records, byte for byte.
func generate(n int, now time.Time) generated {
	rng := rand.New(rand.NewPCG(4, 2))
	g := generated{malformed: map[string]int{}, byID: map[string][]byte{}}
	var validIDs []string
	routes := []string{"/v1/search", "/v1/items", "/v1/orders", "/v1/users"}
	for len(g.records) < n {
		i := len(g.records)
		switch r := rng.IntN(100); {
		case r < 1:
			var b []byte
			switch i % 4 {
			case 0:
				b = []byte(fmt.Sprintf("not json %d", i))
			case 1:
				b = []byte(fmt.Sprintf(`{"v":1,"id":"%s","surprise":%d}`, schemas.NewEventID(), i))
			case 2:
				b = []byte(fmt.Sprintf(`{"v":1,"id":"%s","account_id":"acct_01","env":"live","key_id":"k","type":"api_call","time":"%s","units":-%d}`,
					schemas.NewEventID(), now.Format(time.RFC3339Nano), i+1))
			default:
				b = []byte(fmt.Sprintf(`{"v":99,"id":"%s","n":%d}`, schemas.NewEventID(), i))
			}
			g.malformed[string(b)]++
			g.records = append(g.records, kafka.Message{Key: []byte("acct_bad"), Value: b})
		case r < 6 && len(validIDs) > 0:
			id := validIDs[rng.IntN(len(validIDs))]
			acct := strings.SplitN(string(g.byID[id]), `"account_id":"`, 2)[1][:7]
			g.records = append(g.records, kafka.Message{Key: []byte(acct), Value: g.byID[id]})
		default:
			acct := fmt.Sprintf("acct_%02d", rng.IntN(10))
			e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: schemas.Live,
				KeyID: "key_" + acct, Type: "api_call", Time: now.Add(-time.Duration(rng.Int64N(int64(10 * time.Minute)))),
				Route: routes[rng.IntN(len(routes))], Method: "GET", Status: []int{200, 201, 404, 500}[rng.IntN(4)],
				ResponseBytes: rng.Int64N(100000), Units: 1 + rng.Int64N(3),
				Dimensions: map[string]string{"user": fmt.Sprint("u", rng.IntN(50)), "balance": fmt.Sprint(rng.IntN(1000))}}
			if rng.IntN(10) == 0 {
				e.Environment = schemas.Test
			}
			late := false
			switch r := rng.IntN(1000); {
			case r < 50: // late, within the 35-day lateness
				e.Time = now.Add(-time.Duration(rng.Int64N(int64(30 * 24 * time.Hour))))
			case r < 52: // beyond it: kept in late_events, not counted
				e.Time = now.Add(-40*24*time.Hour - time.Duration(rng.Int64N(int64(24*time.Hour))))
				late = true
			}
			e.Normalize()
			b, err := e.Encode()
			if err != nil {
				panic(err)
			}
			g.byID[e.ID.String()] = b
			validIDs = append(validIDs, e.ID.String())
			if late {
				g.tooLate = append(g.tooLate, e)
			} else {
				g.timely = append(g.timely, e)
			}
			g.records = append(g.records, kafka.Message{Key: []byte(acct), Value: b})
		}
	}
	return g
}

// TestExactlyOnceThroughCrashesAndAClickHouseRestart is the issue's
// exactness test: 100,000 records with 5 % duplicates, late events and 1 %
// malformed records go through the real `tollgate ingest` process, which is
// killed with SIGKILL twice mid-run and restarted, while a private
// ClickHouse is stopped and restarted once, and the private Kafka broker
// it reads from is stopped and restarted once. Afterwards the raw table holds
// each distinct valid event exactly once, every rollup row of every meter
// and granularity equals a plain-Go computation from the generated list,
// and the dead-letter topic holds exactly the malformed records, once each.
func TestExactlyOnceThroughCrashesAndAClickHouseRestart(t *testing.T) {
	const total = 100_000
	pg := testenv.NewPostgres(t)
	chi := testenv.PrivateClickHouse(t)
	broker := testenv.PrivateKafka(t)
	brokers := []string{broker.Addr}
	topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
	dlq := topic + ".dlq"
	kc := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	for _, name := range []string{topic, dlq} {
		res, err := kc.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
			Topics: []kafka.TopicConfig{{Topic: name, NumPartitions: 4, ReplicationFactor: 1}}})
		testenv.Must(t, err, "create topic "+name)
		testenv.Must(t, res.Errors[name], "create topic "+name)
	}
	ctx := context.Background()
	for a, z := range exactZones {
		_, err := pg.Pool.Exec(ctx, "INSERT INTO accounts (id, name, timezone) VALUES ($1, $1, $2)", a, z)
		testenv.Must(t, err, "create account")
	}

	dir := t.TempDir()
	bin := filepath.Join(dir, "tollgate")
	build := exec.Command("go", "build", "-o", bin, "./cmd/tollgate")
	build.Dir = testenv.RepoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tollgate: %v\n%s", err, out)
	}
	cfgPath := filepath.Join(dir, "tollgate.yaml")
	writeConfig(t, cfgPath, pg.URL, chi.Addr, brokers, topic, dlq)

	logf, err := os.Create(filepath.Join(dir, "ingest.log"))
	testenv.Must(t, err, "ingest log")
	defer logf.Close()
	var proc *exec.Cmd
	start := func() {
		proc = exec.Command(bin, "ingest", "--config", cfgPath, "--log-level", "warn")
		proc.Env = testenv.ChildEnv() // the file, not `make test`'s environment, says where things are
		proc.Stdout, proc.Stderr = logf, logf
		testenv.Must(t, proc.Start(), "start ingest")
	}
	kill9 := func() {
		testenv.Must(t, proc.Process.Kill(), "kill -9 ingest")
		_ = proc.Wait()
	}
	t.Cleanup(func() {
		if proc != nil && proc.ProcessState == nil {
			_ = proc.Process.Kill()
			_ = proc.Wait()
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("ingest log (tail):\n%s", b)
		}
	})

	now := time.Now().UTC()
	g := generate(total, now)
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{},
		RequiredAcks: kafka.RequireAll, BatchSize: 5000, BatchTimeout: 5 * time.Millisecond}
	defer w.Close()
	produce := func(from, to int) {
		for i := from; i < to; i += 5000 {
			testenv.Must(t, w.WriteMessages(ctx, g.records[i:min(i+5000, to)]...), "produce")
		}
	}
	offsets := ingestkafka.NewOffsets(brokers, kafkaconn.Security{}, topic, topic+".ingest")
	committed := func() int64 {
		offs, err := offsets.Offsets(ctx)
		if err != nil {
			return 0
		}
		var n int64
		for _, o := range offs {
			if o.Committed > 0 {
				n += o.Committed
			}
		}
		return n
	}
	began := time.Now()
	waitCommitted := func(n int64, what string) {
		testenv.Wait(t, 3*time.Minute, what, func() bool { return committed() >= n })
		t.Logf("%6.1fs %s", time.Since(began).Seconds(), what)
	}

	start()
	produce(0, 30_000)
	waitCommitted(10_000, "ingest to land the first records")
	kill9() // mid-run: records fetched, some inserted, offsets not committed
	produce(30_000, 55_000)
	start()
	waitCommitted(35_000, "ingest to resume after the first kill -9")
	// Failed steps ingest retries, as its log lines say.
	retries := func(step string) int {
		b, _ := os.ReadFile(logf.Name())
		n := 0
		for _, line := range bytes.Split(b, []byte("\n")) {
			if bytes.Contains(line, []byte("ingest step failed, retrying")) && bytes.Contains(line, []byte("step="+step+" ")) {
				n++
			}
		}
		return n
	}
	insertRetries := func() int { return retries("insert") }
	before := insertRetries()
	chi.Stop() // inserts fail; ingest retries and holds its offsets
	offs, err := offsets.Offsets(ctx)
	testenv.Must(t, err, "read the topic's end offsets")
	var ends int64
	for _, o := range offs {
		ends += o.End
	}
	produce(55_000, 70_000)
	// The outage must be met, not slept through: ingest retries a failed
	// insert, and commits none of the records sent during it.
	testenv.Wait(t, time.Minute, "ingest to meet the ClickHouse outage (a retried insert in its log)", func() bool { return insertRetries() > before })
	if n := committed(); n > ends {
		t.Fatalf("%d offsets committed while ClickHouse was down; at most the %d in the topic when it stopped may be", n, ends)
	}
	chi.Start()
	waitCommitted(60_000, "ingest to resume after the ClickHouse restart")
	// The broker stops with records fetched and not yet committed: ingest
	// meets it mid-run, loses its group coordinator and its commits, and
	// picks up where the restarted broker says it committed.
	produce(70_000, 90_000)
	if n := committed(); n >= 90_000 {
		t.Fatalf("ingest had landed all %d records before the broker stopped: the restart would meet nothing", n)
	}
	kafkaRetries := retries("fetch") + retries("commit")
	broker.Stop()
	// The outage must be met, not slept through: a fetch or a commit
	// fails, and ingest retries it.
	testenv.Wait(t, time.Minute, "ingest to meet the Kafka outage (a retried fetch or commit in its log)", func() bool {
		return retries("fetch")+retries("commit") > kafkaRetries
	})
	broker.Start()
	waitCommitted(75_000, "ingest to resume after the Kafka broker restart")
	kill9()
	start()
	produce(90_000, total)
	waitCommitted(total, "ingest to land every record")

	ch := openCH(t, chi.Addr)
	t.Run("raw rows equal the distinct valid events", func(t *testing.T) {
		var rows, ids uint64
		testenv.Must(t, ch.QueryRow(ctx, "SELECT count(), uniqExact(event_id) FROM usage_events FINAL").Scan(&rows, &ids), "count raw")
		if rows != uint64(len(g.timely)) || ids != uint64(len(g.timely)) {
			t.Errorf("raw rows %d, distinct ids %d; want %d distinct valid events", rows, ids, len(g.timely))
		}
		var late uint64
		testenv.Must(t, ch.QueryRow(ctx, "SELECT count() FROM late_events FINAL").Scan(&late), "count late")
		if late != uint64(len(g.tooLate)) {
			t.Errorf("late_events holds %d events, want the %d generated beyond the lateness", late, len(g.tooLate))
		}
	})
	t.Run("every rollup equals an independent computation", func(t *testing.T) {
		compareRollups(t, ch, g.timely)
	})
	t.Run("the dead-letter topic holds exactly the malformed records", func(t *testing.T) {
		got := readAll(t, brokers, dlq, 4)
		seen := map[string]bool{}
		for _, m := range got {
			src := header(m, ingestkafka.HeaderSourcePartition) + "/" + header(m, ingestkafka.HeaderSourceOffset)
			if seen[src] {
				t.Errorf("source record %s dead-lettered twice", src)
			}
			seen[src] = true
			if header(m, ingestkafka.HeaderReason) == "" {
				t.Errorf("dead letter for %s has no reason", src)
			}
			if g.malformed[string(m.Value)] != 1 {
				t.Errorf("dead letter %q is not one of the malformed records", m.Value)
			}
		}
		if len(got) != len(g.malformed) {
			t.Errorf("dead-letter topic holds %d records, want %d malformed", len(got), len(g.malformed))
		}
	})
	t.Run("watermarks cover every partition", func(t *testing.T) {
		testenv.Wait(t, 30*time.Second, "watermarks for 4 partitions past the start of the run", func() bool {
			var n uint64
			var min time.Time
			err := ch.QueryRow(ctx, "SELECT count(), min(watermark) FROM watermarks FINAL").Scan(&n, &min)
			return err == nil && n == 4 && min.After(now.Add(-time.Minute))
		})
	})
	t.Logf("records %d: %d distinct timely, %d too late, %d malformed", total, len(g.timely), len(g.tooLate), len(g.malformed))
}

func writeConfig(t *testing.T, path, pgURL, chAddr string, brokers []string, topic, dlq string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "services:\n  postgres_url: %q\n  clickhouse_addr: %q\n  clickhouse_database: tollgate\n  kafka_brokers: [%q]\n",
		pgURL, chAddr, strings.Join(brokers, ","))
	fmt.Fprintf(&b, "ingest:\n  topic: %q\n  dead_letter_topic: %q\n  group: %q\n  workers: 2\n  batch_size: 3000\n  batch_wait: 100ms\n  retry_period: 250ms\n  watermark_interval: 500ms\n",
		topic, dlq, topic+".ingest")
	b.WriteString("meters:\n")
	for _, m := range exactMeters {
		fmt.Fprintf(&b, "  - key: %s\n    event_type: %s\n    aggregation: %s\n", m.Key, m.EventType, m.Aggregation)
		if m.Value != "" {
			fmt.Fprintf(&b, "    value: %s\n", m.Value)
		}
		if len(m.GroupBy) > 0 {
			fmt.Fprintf(&b, "    group_by: [%s]\n", strings.Join(m.GroupBy, ", "))
		}
	}
	testenv.Must(t, os.WriteFile(path, []byte(b.String()), 0o600), "write config")
}

func openCH(t *testing.T, addr string) driver.Conn {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{addr},
		Auth: clickhouse.Auth{Database: "tollgate", Username: "default"}, Protocol: clickhouse.Native,
		DialTimeout: 5 * time.Second})
	testenv.Must(t, err, "open clickhouse")
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func compareRollups(t *testing.T, ch driver.Conn, events []schemas.Event) {
	t.Helper()
	locs, err := aggregatortest.Locations(exactZones)
	testenv.Must(t, err, "load zones")
	for _, m := range exactMeters {
		for _, g := range aggregator.Granularities {
			want := aggregatortest.Expected(events, m, g, locs)
			rows, err := ch.Query(context.Background(), `SELECT account_id, toString(environment), window_start, group_values, value
				FROM usage_rollups FINAL WHERE meter = ? AND granularity = ?`, m.Key, string(g))
			testenv.Must(t, err, "read rollups")
			got := map[aggregatortest.Key]int64{}
			for rows.Next() {
				var acct, env string
				var ws time.Time
				var group []string
				var v int64
				testenv.Must(t, rows.Scan(&acct, &env, &ws, &group, &v), "scan rollup")
				got[aggregatortest.Key{Account: acct, Environment: schemas.Environment(env), Granularity: g,
					WindowStart: ws.UTC(), Group: strings.Join(group, "\x00"), Total: len(group) == 0}] = v
			}
			rows.Close()
			for _, d := range aggregatortest.Diff(want, got, 3) {
				t.Errorf("meter %s by %s: %s", m.Key, g, d)
			}
		}
	}
}

// readAll reads every record of topic's partitions from the start.
func readAll(t *testing.T, brokers []string, topic string, partitions int) []kafka.Message {
	t.Helper()
	var out []kafka.Message
	for p := 0; p < partitions; p++ {
		conn, err := kafka.DialLeader(context.Background(), "tcp", brokers[0], topic, p)
		testenv.Must(t, err, "dial dead-letter partition")
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		first, last, err := conn.ReadOffsets()
		testenv.Must(t, err, "dead-letter offsets")
		off := first
		for off < last {
			_, err := conn.Seek(off, kafka.SeekAbsolute)
			testenv.Must(t, err, "seek")
			batch := conn.ReadBatch(1, 10<<20)
			for {
				m, err := batch.ReadMessage()
				if err != nil {
					break
				}
				out = append(out, m)
				off = m.Offset + 1
			}
			_ = batch.Close()
		}
		_ = conn.Close()
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Partition < out[j].Partition || (out[i].Partition == out[j].Partition && out[i].Offset < out[j].Offset)
	})
	return out
}

func header(m kafka.Message, k string) string {
	for _, h := range m.Headers {
		if h.Key == k {
			return string(h.Value)
		}
	}
	return ""
}
