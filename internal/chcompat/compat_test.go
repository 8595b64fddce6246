package chcompat_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/aggregatortest"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	"github.com/tollgate-dev/tollgate/ingest"
	ingestch "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestEveryStatementRunsAlikeOnClickHouse18And24 records every statement
// the ClickHouse code sends to ClickHouse 18.16 during a workload that
// exercises all of it, replays them in order on ClickHouse 24.8's engine
// (chdb), and requires every statement to succeed there, every read to
// answer the same rows, and every table to end with the same contents.
func TestEveryStatementRunsAlikeOnClickHouse18And24(t *testing.T) {
	python := testenv.ChdbPython(t)
	ch := testenv.NewClickHouse(t)
	rec := &recorder{t: t, db: ch.Database, pending: -1}
	opts := testenv.ClickHouseOptions(ch.Database)
	opts.Logger = slog.New(rec)
	conn, err := clickhouse.Open(opts)
	testenv.Must(t, err, "connect to clickhouse")
	defer conn.Close()
	ctx := context.Background()
	// The server must be 18.16, the release services.sh installs: on
	// another (docker compose's 24.8 on the same port, say), this test
	// would compare a release with itself and prove nothing about 18.16.
	var version string
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT version()").Scan(&version), "ask the server's version") // not recorded
	if !strings.HasPrefix(version, "18.16.") {
		t.Fatalf("the ClickHouse at %s is %s, not 18.16: this test records on 18.16 and replays on 24.8; "+
			"stop what serves that port (docker compose down) and start the native one (make services)", testenv.ClickHouseAddr(), version)
	}

	// The schema is in place on 18.16 already; applied again (it is
	// idempotent) so that the replay creates it on 24.8.
	testenv.Must(t, schemas.ApplyClickHouse(ctx, conn), "apply the schema")
	start := time.Now()
	workload(t, ctx, conn, rec)
	recorded := time.Since(start)
	for _, q := range []string{
		`SELECT event_id, schema_version, account_id, environment, key_id, event_type, timestamp, timestamp_us, route,
			method, status, latency_us, request_bytes, response_bytes, units, request_id, client_id, dim_keys, dim_values,
			kafka_partition, kafka_offset FROM usage_events FINAL ORDER BY event_id`,
		`SELECT account_id, environment, meter, granularity, window_start, group_values, value, events, latest_us,
			latest_id, finalizeAggregation(uniq_state) FROM usage_rollups FINAL
			ORDER BY account_id, environment, meter, granularity, window_start, group_values`,
		`SELECT event_id, account_id, environment, key_id, event_type, timestamp, timestamp_us, units, record_time,
			kafka_partition, kafka_offset, payload FROM late_events FINAL ORDER BY event_id`,
		`SELECT partition, watermark FROM watermarks FINAL ORDER BY partition`,
	} {
		rec.read(q, true)
	}

	start = time.Now()
	got := replay(t, python, rec.steps)
	replayed := time.Since(start)
	compared, failed := 0, 0
	for i, s := range rec.steps {
		if g := got[i]; g.Error != nil {
			failed++
			t.Errorf("ClickHouse 24.8 refused statement %d:\n%s\n%s", i, clip(s.SQL), *g.Error)
			continue
		}
		if !s.compare {
			continue
		}
		compared++
		if d := diff(s.want, *got[i].Result); d != "" {
			t.Errorf("statement %d answers differently on 24.8 than on 18.16:\n%s\n%s", i, clip(s.SQL), d)
		}
	}
	writes := 0
	for _, s := range rec.steps {
		if !s.Read {
			writes++
		}
	}
	t.Logf("%d statements replayed on ClickHouse 24.8 (%d writes, %d reads, %d answers compared with 18.16), %d refused; recorded in %s, replayed in %s",
		len(rec.steps), writes, len(rec.steps)-writes, compared, failed, recorded.Round(time.Millisecond), replayed.Round(time.Millisecond))
	// A workload that sent nothing would pass vacuously.
	if writes < 20 || compared < 40 {
		t.Fatalf("only %d writes and %d compared reads were recorded: the recorder missed the client's statements", writes, compared)
	}
}

// workload runs every ClickHouse statement path once or more: raw, late and
// watermark inserts; rollup recomputes at every level for every kind of
// meter, a redelivered batch, a rebuild; the usage API's reads; the
// invoicer's reads with and without FINAL; and the analyst queries the
// documentation shows.
func workload(t *testing.T, ctx context.Context, conn driver.Conn, rec *recorder) {
	t.Helper()
	now := time.Now().UTC()
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(5, 6)), 1200, now.Add(-time.Hour))
	meters := aggregatortest.Meters()
	zones := aggregatortest.Zones()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sink := ingestch.NewSink(conn)
	store := aggch.NewStore(conn)
	roller := aggregator.NewRoller(aggregator.StaticMeters(meters), zones, store, log)

	// Each batch spreads over 40 days, so it touches hundreds of windows
	// and its recomputes use every clustering path; two batches are enough.
	for i := 0; i < len(events); i += 600 {
		batch := aggregatortest.Records(events[i:min(i+600, len(events))])
		copies := 1
		if i > 0 {
			copies = 2 // landed twice, as a redelivery would
		}
		for range copies {
			testenv.Must(t, sink.Insert(ctx, batch), "insert raw events")
			rec.rows("usage_events", "event_id IN ("+uuidList(batch)+") LIMIT 1 BY event_id")
			testenv.Must(t, roller.Landed(ctx, batch), "recompute rollups")
		}
	}

	late := aggregatortest.Records(aggregatortest.GenEvents(rand.New(rand.NewPCG(7, 8)), 20, now.AddDate(0, -3, 0)))
	for i := range late {
		late[i].RecordTime = now.Truncate(time.Second)
		late[i].Value, _ = late[i].Event.Encode()
	}
	kept, err := sink.InsertLate(ctx, late)
	testenv.Must(t, err, "insert late events")
	if len(kept) != len(late) {
		t.Fatalf("%d of %d late events written; none has a counted copy", len(kept), len(late))
	}
	rec.rows("late_events", "event_id IN ("+uuidList(late)+") LIMIT 1 BY event_id")

	at := now.Truncate(time.Second)
	testenv.Must(t, sink.SetWatermarks(ctx, map[int]time.Time{0: at.Add(-time.Hour), 1: at.Add(-2 * time.Hour)}, at), "set watermarks")
	rec.rows("watermarks", "1")
	_, err = sink.Watermarks(ctx)
	testenv.Must(t, err, "read watermarks")

	// The usage API's reads.
	for _, m := range meters {
		for _, g := range aggregator.Granularities {
			for _, grouped := range []bool{false, true} {
				rows, err := store.Usage(ctx, aggregator.UsageQuery{Account: "acct_tokyo", Environment: "live", Meter: m.Key,
					Granularity: g, From: now.AddDate(0, -2, 0), To: now, Grouped: grouped, Limit: 1000})
				testenv.Must(t, err, "read usage")
				if len(rows) > 0 { // the next page, after the first row
					_, err = store.Usage(ctx, aggregator.UsageQuery{Account: "acct_tokyo", Environment: "live", Meter: m.Key,
						Granularity: g, From: now.AddDate(0, -2, 0), To: now, Grouped: grouped, Limit: 1000, After: &rows[0]})
					testenv.Must(t, err, "read usage after a row")
				}
			}
		}
	}
	for _, combine := range []string{"sum", "max"} {
		_, err := store.Usage(ctx, aggregator.UsageQuery{Account: "acct_utc", Environment: "live", Meter: "bytes_out",
			Granularity: aggregator.Day, From: now.AddDate(0, -2, 0), To: now, Grouped: true, Pick: []int{0},
			Combine: combine, Limit: 5, After: &aggregator.UsageRow{WindowStart: now.AddDate(0, -1, 0), Group: []string{"/a"}}})
		testenv.Must(t, err, "read usage by one group")
	}
	page, err := store.Requests(ctx, aggregator.RequestsQuery{Account: "acct_kolkata", Environment: "live",
		KeyID: "key_1", Since: now.AddDate(0, -2, 0), Limit: 20})
	testenv.Must(t, err, "read requests")
	if len(page) == 0 {
		t.Fatal("the request log is empty")
	}
	last := page[len(page)-1]
	_, err = store.Requests(ctx, aggregator.RequestsQuery{Account: "acct_kolkata", Environment: "live",
		KeyID: "key_1", Since: now.AddDate(0, -2, 0), BeforeMicros: last.TimeMicros, BeforeID: last.EventID, Limit: 20})
	testenv.Must(t, err, "read the request log's next page")
	_, err = store.TooLate(ctx, "acct_utc", "live", now.AddDate(0, -4, 0), now)
	testenv.Must(t, err, "count late events")
	_, _, err = store.CompleteThrough(ctx)
	testenv.Must(t, err, "read completeness")
	_, err = store.Accounts(ctx, now.AddDate(0, -1, 0), now)
	testenv.Must(t, err, "list accounts")
	_, _, _, err = store.EventRange(ctx)
	testenv.Must(t, err, "read the event range")

	// One month is enough to run every level's rebuild SQL: each month
	// repeats it, and 24.8 plans each statement in about 0.15 s.
	month := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	testenv.Must(t, aggregator.RebuildAll(ctx, store, zones, meters, month, month.AddDate(0, 1, 0), log), "rebuild rollups")

	// The invoicer: unmerged parts are read with FINAL; after OPTIMIZE
	// every month partition is one merged part and FINAL is skipped.
	inv := invch.New(conn)
	period := invoicer.Period{Start: time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -1, 0)}
	period.End = period.Start.AddDate(0, 2, 0)
	for _, env := range []schemas.Environment{schemas.Live, schemas.Test} {
		_, err := inv.Usage(ctx, aggregatortest.Accounts, period, meters, env)
		testenv.Must(t, err, "invoicer usage")
	}
	testenv.Must(t, conn.Exec(ctx, "OPTIMIZE TABLE usage_events FINAL"), "merge raw events")
	_, err = inv.Usage(ctx, aggregatortest.Accounts, period, meters, schemas.Live)
	testenv.Must(t, err, "invoicer usage over merged parts")
	_, err = inv.Watermark(ctx)
	testenv.Must(t, err, "invoicer watermark")

	for _, q := range docQueries(t) {
		// Queries relative to now() answer for slightly different instants
		// on the two servers; they are run, not compared.
		rec.read(q, !strings.Contains(q, "now()") && !strings.Contains(q, "today()"))
	}
}

// step is one statement as the client sent it.
type step struct {
	SQL  string `json:"sql"`
	Read bool   `json:"read"`
	// want is 18.16's answer to a read, TabSeparated, and compare whether
	// 24.8's must equal it.
	want    string
	compare bool
}

// recorder is a slog.Handler for the ClickHouse client's debug log: it
// keeps every query the client sends, in order. It asks 18.16 for each
// read's answer over HTTP just before the client sends it, when the data
// is as the client will see it, since the workload runs one statement at a
// time.
type recorder struct {
	t  testing.TB
	db string

	mu    sync.Mutex
	steps []step
	// pending is the native insert whose rows rows() has yet to fetch.
	pending int
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recorder) WithGroup(string) slog.Handler            { return r }

func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	if rec.Message != "sending query" {
		return nil
	}
	var q string
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "query" {
			q = a.Value.String()
			return false
		}
		return true
	})
	head := strings.ToUpper(strings.TrimSpace(q))
	switch {
	case strings.HasPrefix(head, "SELECT") || strings.HasPrefix(head, "WITH"):
		r.read(q, !strings.Contains(q, "system."))
	case strings.HasPrefix(head, "INSERT") && !strings.Contains(head, "SELECT"):
		// A native insert: its rows travel as blocks, not in the text.
		r.mu.Lock()
		if r.pending >= 0 {
			r.t.Errorf("native insert with no rows recorded: %s", clip(r.steps[r.pending].SQL))
		}
		r.pending = len(r.steps)
		r.steps = append(r.steps, step{SQL: q})
		r.mu.Unlock()
	default:
		r.mu.Lock()
		r.steps = append(r.steps, step{SQL: q})
		r.mu.Unlock()
	}
	return nil
}

// read records a read with 18.16's answer.
func (r *recorder) read(q string, compare bool) {
	want, err := r.http(q + "\nFORMAT TabSeparated")
	if err != nil {
		r.t.Errorf("ClickHouse 18.16 refused a read over HTTP: %v\n%s", err, clip(q))
	}
	r.mu.Lock()
	r.steps = append(r.steps, step{SQL: q, Read: true, want: want, compare: compare})
	r.mu.Unlock()
}

var insertHead = regexp.MustCompile(`(?is)^\s*INSERT\s+INTO\s+(\w+)\s*\(([^)]*)\)`)

// rows completes the last native insert with the rows it wrote, read back
// from 18.16 as TabSeparated text: where selects them in its table.
func (r *recorder) rows(table, where string) {
	r.t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending < 0 {
		r.t.Fatalf("no native insert into %s was recorded", table)
	}
	s := &r.steps[r.pending]
	m := insertHead.FindStringSubmatch(s.SQL)
	if m == nil || m[1] != table {
		r.t.Fatalf("the recorded native insert is not into %s: %s", table, clip(s.SQL))
	}
	data, err := r.http(fmt.Sprintf("SELECT %s FROM %s WHERE %s FORMAT TabSeparated", m[2], table, where))
	if err != nil {
		r.t.Fatalf("read back the rows inserted into %s: %v", table, err)
	}
	if data == "" {
		r.t.Fatalf("no rows read back from %s", table)
	}
	s.SQL = fmt.Sprintf("INSERT INTO %s (%s) FORMAT TabSeparated\n%s", table, m[2], data)
	r.pending = -1
}

func (r *recorder) http(q string) (string, error) {
	u := testenv.ClickHouseHTTPURL() + "/?" + url.Values{"database": {r.db}}.Encode()
	resp, err := http.Post(u, "text/plain", strings.NewReader(q))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}

type outcome struct {
	Error  *string `json:"error"`
	Result *string `json:"result"`
}

// replay runs steps on chdb and returns each one's outcome.
func replay(t *testing.T, python string, steps []step) []outcome {
	t.Helper()
	in := filepath.Join(t.TempDir(), "steps.json")
	b, err := json.Marshal(steps)
	testenv.Must(t, err, "encode steps")
	testenv.Must(t, os.WriteFile(in, b, 0o600), "write steps")
	cmd := exec.Command(python, filepath.Join(testenv.RepoRoot(t), "internal", "chcompat", "replay.py"), in)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("replay on chdb: %v\n%s", err, stderr.String())
	}
	version := strings.TrimSpace(stderr.String())
	if !strings.HasPrefix(version, "24.8.") {
		t.Fatalf("chdb runs ClickHouse %q, not the 24.8 that docker-compose.yml pins", version)
	}
	var got []outcome
	testenv.Must(t, json.Unmarshal(out, &got), "decode replay outcomes")
	if len(got) != len(steps) {
		t.Fatalf("replay reported %d outcomes for %d steps", len(got), len(steps))
	}
	return got
}

// diff compares two TabSeparated answers as multisets of rows (a
// statement without ORDER BY may list them in any order); "" when they are
// equal, else a few of the rows only one side has.
func diff(want, got string) string {
	w, g := lines(want), lines(got)
	if slices.Equal(w, g) {
		return ""
	}
	var onlyW, onlyG []string
	i, j := 0, 0
	for i < len(w) || j < len(g) {
		switch {
		case j == len(g) || (i < len(w) && w[i] < g[j]):
			onlyW = append(onlyW, w[i])
			i++
		case i == len(w) || g[j] < w[i]:
			onlyG = append(onlyG, g[j])
			j++
		default:
			i++
			j++
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "18.16: %d rows, 24.8: %d rows", len(w), len(g))
	for _, side := range []struct {
		name string
		rows []string
	}{{"only on 18.16", onlyW}, {"only on 24.8", onlyG}} {
		for k, r := range side.rows[:min(3, len(side.rows))] {
			if k == 0 {
				fmt.Fprintf(&b, "\n  %s (%d):", side.name, len(side.rows))
			}
			fmt.Fprintf(&b, "\n    %q", r)
		}
	}
	return b.String()
}

func lines(s string) []string {
	out := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(out) == 1 && out[0] == "" {
		return nil
	}
	slices.Sort(out)
	return out
}

// docQueries are the SQL examples in the README and docs/usage-api.md, one
// statement each.
func docQueries(t *testing.T) []string {
	t.Helper()
	var out []string
	block := regexp.MustCompile("(?s)```sql\n(.*?)```")
	for _, f := range []string{"README.md", "docs/usage-api.md"} {
		b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), f))
		testenv.Must(t, err, "read "+f)
		for _, m := range block.FindAllStringSubmatch(string(b), -1) {
			for _, s := range strings.Split(m[1], ";") {
				var kept []string
				for _, l := range strings.Split(s, "\n") {
					if !strings.HasPrefix(strings.TrimSpace(l), "--") {
						kept = append(kept, l)
					}
				}
				if q := strings.TrimSpace(strings.Join(kept, "\n")); q != "" {
					out = append(out, q)
				}
			}
		}
	}
	if len(out) < 5 {
		t.Fatalf("found only %d SQL examples in the documentation", len(out))
	}
	return out
}

func uuidList(rs []ingest.Record) string {
	ids := make([]string, len(rs))
	for i, r := range rs {
		ids[i] = "toUUID('" + r.Event.ID.String() + "')"
	}
	return strings.Join(ids, ", ")
}

func clip(q string) string {
	q = strings.TrimSpace(q)
	if len(q) > 600 {
		return q[:600] + " …"
	}
	return q
}
