package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
)

// rebuildEvent is one raw event and the windows it belongs to in its
// account's zone, written out by hand (instants in UTC).
type rebuildEvent struct {
	id                       uuid.UUID
	account, env, typ, route string
	bytes                    int64
	at, hour, day, month     string
	insertedTwice            bool
}

// rebuildEvents straddle a month boundary in two zones: Kolkata (UTC+05:30,
// so its hours start at :30 UTC and its February at 18:30 UTC on 31
// January) and UTC.
var rebuildEvents = []rebuildEvent{
	// 23:59 on 31 January in Kolkata.
	{account: "acct_kolkata", env: "live", typ: "api_call", route: "/v1/a", bytes: 100, at: "2026-01-31T18:29:00Z",
		hour: "2026-01-31T17:30:00Z", day: "2026-01-30T18:30:00Z", month: "2025-12-31T18:30:00Z"},
	// 00:00:30 on 1 February in Kolkata; delivered twice, counted once.
	{account: "acct_kolkata", env: "live", typ: "api_call", route: "/v1/a", bytes: 200, at: "2026-01-31T18:30:30Z",
		hour: "2026-01-31T18:30:00Z", day: "2026-01-31T18:30:00Z", month: "2026-01-31T18:30:00Z", insertedTwice: true},
	{account: "acct_kolkata", env: "live", typ: "api_call", route: "/v1/b", bytes: 40, at: "2026-01-31T18:30:45Z",
		hour: "2026-01-31T18:30:00Z", day: "2026-01-31T18:30:00Z", month: "2026-01-31T18:30:00Z"},
	// An event type no meter selects.
	{account: "acct_kolkata", env: "live", typ: "webhook", route: "/v1/a", bytes: 5000, at: "2026-01-31T18:30:50Z",
		hour: "2026-01-31T18:30:00Z", day: "2026-01-31T18:30:00Z", month: "2026-01-31T18:30:00Z"},
	// Test mode has rows of its own.
	{account: "acct_kolkata", env: "test", typ: "api_call", route: "/v1/a", bytes: 7, at: "2026-01-31T18:31:00Z",
		hour: "2026-01-31T18:30:00Z", day: "2026-01-31T18:30:00Z", month: "2026-01-31T18:30:00Z"},
	{account: "acct_utc", env: "live", typ: "api_call", route: "/v1/a", bytes: 1000, at: "2026-01-31T18:29:10Z",
		hour: "2026-01-31T18:00:00Z", day: "2026-01-31T00:00:00Z", month: "2026-01-01T00:00:00Z"},
	{account: "acct_utc", env: "live", typ: "api_call", route: "/v1/a", bytes: 2000, at: "2026-01-31T23:59:59Z",
		hour: "2026-01-31T23:00:00Z", day: "2026-01-31T00:00:00Z", month: "2026-01-01T00:00:00Z"},
	{account: "acct_utc", env: "live", typ: "api_call", route: "/v1/b", bytes: 3000, at: "2026-02-01T00:00:00Z",
		hour: "2026-02-01T00:00:00Z", day: "2026-02-01T00:00:00Z", month: "2026-02-01T00:00:00Z"},
}

// rebuildMeters: api_calls comes from the configuration file,
// bytes_by_route from the meters table (as the admin API stores it).
var rebuildMeters = []meter.Meter{
	meter.Default(),
	{Key: "bytes_by_route", EventType: "api_call", Aggregation: meter.Sum, Value: "response_bytes", GroupBy: []string{"route"}},
}

// rollupKey names one rollup row; rollupVal is what it holds.
type rollupKey struct {
	account, env, meter, granularity string
	windowStart                      time.Time
	groups                           string
}

type rollupVal struct{ value, events int64 }

func (k rollupKey) String() string {
	return fmt.Sprintf("%s/%s %s %s %s [%s]", k.account, k.env, k.meter, k.granularity,
		k.windowStart.UTC().Format(time.RFC3339), k.groups)
}

func mustTime(t *testing.T, s string) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339, s)
	testenv.Must(t, err, "parse "+s)
	return at
}

// expectedRollups folds the distinct events into the rows every meter and
// granularity must have: the meter's total ([]) and, for a grouped meter,
// one row per route.
func expectedRollups(t *testing.T, evs []rebuildEvent) map[rollupKey]rollupVal {
	t.Helper()
	out := map[rollupKey]rollupVal{}
	for _, e := range evs {
		at := mustTime(t, e.at)
		windows := map[string]time.Time{
			"minute": at.Truncate(time.Minute), "hour": mustTime(t, e.hour),
			"day": mustTime(t, e.day), "month": mustTime(t, e.month),
		}
		for _, m := range rebuildMeters {
			if m.EventType != e.typ {
				continue
			}
			v := int64(1)
			if m.Aggregation == meter.Sum {
				v = e.bytes
			}
			groups := []string{""}
			if len(m.GroupBy) > 0 {
				groups = append(groups, e.route)
			}
			for g, ws := range windows {
				for _, grp := range groups {
					k := rollupKey{e.account, e.env, m.Key, g, ws, grp}
					r := out[k]
					out[k] = rollupVal{r.value + v, r.events + 1}
				}
			}
		}
	}
	return out
}

func readRollups(t *testing.T, ch *testenv.ClickHouse) map[rollupKey]rollupVal {
	t.Helper()
	rows, err := ch.Conn.Query(context.Background(), `SELECT account_id, toString(environment), meter,
		toString(granularity), window_start, group_values, value, events FROM usage_rollups FINAL`)
	testenv.Must(t, err, "read rollups")
	defer rows.Close()
	out := map[rollupKey]rollupVal{}
	for rows.Next() {
		var k rollupKey
		var groups []string
		var value int64
		var events uint64
		testenv.Must(t, rows.Scan(&k.account, &k.env, &k.meter, &k.granularity, &k.windowStart, &groups, &value, &events), "scan rollup")
		k.windowStart = k.windowStart.UTC()
		k.groups = strings.Join(groups, ",")
		if _, dup := out[k]; dup {
			t.Errorf("rollup row %s read twice through FINAL", k)
		}
		out[k] = rollupVal{value, int64(events)}
	}
	testenv.Must(t, rows.Err(), "read rollups")
	return out
}

func compareRollups(t *testing.T, step string, got, want map[rollupKey]rollupVal) {
	t.Helper()
	keys := slices.SortedFunc(maps.Keys(want), func(a, b rollupKey) int { return strings.Compare(a.String(), b.String()) })
	for _, k := range keys {
		g, ok := got[k]
		switch {
		case !ok:
			t.Errorf("%s: missing row %s (want value %d from %d events)", step, k, want[k].value, want[k].events)
		case g != want[k]:
			t.Errorf("%s: row %s: value %d from %d events, want %d from %d", step, k, g.value, g.events, want[k].value, want[k].events)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected row %s (value %d from %d events)", step, k, g.value, g.events)
		}
	}
}

// runTollgate runs the tollgate command in-process and returns its output.
func runTollgate(t *testing.T, args ...string) string {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := root.ExecuteContext(ctx); err != nil {
		t.Fatalf("tollgate %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// TestAggregateRebuildRecomputesRollupsFromRawEvents inserts known raw
// events (one of them twice) into a fresh ClickHouse database, runs
// `tollgate aggregate rebuild` with its --meter, --from and --to flags, and
// checks that the rollup rows are exactly those the distinct events imply:
// per meter, environment and window in each account's zone (read from
// Postgres), with no row missing and none extra.
func TestAggregateRebuildRecomputesRollupsFromRawEvents(t *testing.T) {
	pg, ch, evs := landRebuildEvents(t)
	ctx := context.Background()
	created, err := aggpg.NewMeters(pg.Pool).Create(ctx, rebuildMeters[1])
	testenv.Must(t, err, "create stored meter")
	if !created {
		t.Fatal("stored meter was not created")
	}
	var twice []rebuildEvent
	for _, e := range evs {
		if e.insertedTwice {
			twice = append(twice, e)
		}
	}
	insertRebuildEvents(t, ch, twice)

	cfgPath := filepath.Join(t.TempDir(), "tollgate.yaml")
	testenv.Must(t, os.WriteFile(cfgPath, []byte("meters:\n  - key: api_calls\n    event_type: api_call\n    aggregation: COUNT\n"), 0o600), "write config")
	// Environment variables override the file; set them so that the
	// command reaches this test's databases whatever the shell exported.
	t.Setenv("TOLLGATE_POSTGRES_URL", pg.URL)
	t.Setenv("TOLLGATE_CLICKHOUSE_ADDR", ch.Addr)
	t.Setenv("TOLLGATE_CLICKHOUSE_DATABASE", ch.Database)
	rebuild := func(flags ...string) string {
		return runTollgate(t, append([]string{"aggregate", "rebuild", "--config", cfgPath, "--log-level", "error"}, flags...)...)
	}
	want := expectedRollups(t, evs)

	t.Run("one meter rebuilds that meter's rows only", func(t *testing.T) {
		if out := rebuild("--meter", "bytes_by_route"); out != "rebuilt rollups of 1 meter(s)\n" {
			t.Errorf("output %q", out)
		}
		only := maps.Clone(want)
		maps.DeleteFunc(only, func(k rollupKey, _ rollupVal) bool { return k.meter != "bytes_by_route" })
		compareRollups(t, "--meter bytes_by_route", readRollups(t, ch), only)
	})

	t.Run("every meter's rows equal the raw events", func(t *testing.T) {
		if out := rebuild(); out != "rebuilt rollups of 2 meter(s)\n" {
			t.Errorf("output %q", out)
		}
		compareRollups(t, "all meters", readRollups(t, ch), want)
		// A second run recomputes the same rows.
		rebuild()
		compareRollups(t, "second run", readRollups(t, ch), want)
	})

	t.Run("a time range rebuilds the windows that start in it", func(t *testing.T) {
		testenv.Must(t, ch.Conn.Exec(ctx, "TRUNCATE TABLE usage_rollups"), "truncate rollups")
		from, to := mustTime(t, "2026-01-31T18:30:00Z"), mustTime(t, "2026-02-01T00:00:00Z")
		rebuild("--from", from.Format(time.RFC3339), "--to", to.Format(time.RFC3339))
		inRange := maps.Clone(want)
		maps.DeleteFunc(inRange, func(k rollupKey, _ rollupVal) bool {
			return k.windowStart.Before(from) || !k.windowStart.Before(to)
		})
		// Kolkata's first minute of February and its February day and month
		// start at 18:30 UTC, inside the range; UTC's February does not.
		if _, ok := inRange[rollupKey{"acct_kolkata", "live", "api_calls", "month", from, ""}]; !ok {
			t.Fatal("the expected rows lack Kolkata's February; the range no longer tests what it should")
		}
		compareRollups(t, "--from/--to", readRollups(t, ch), inRange)
	})
}

// landRebuildEvents makes fresh databases with rebuildEvents' accounts and
// raw events (fresh ids each), and returns the events as landed.
func landRebuildEvents(t *testing.T) (*testenv.Postgres, *testenv.ClickHouse, []rebuildEvent) {
	t.Helper()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	_, err := pg.Pool.Exec(context.Background(), `INSERT INTO accounts (id, name, timezone)
		VALUES ('acct_kolkata', 'Kolkata', 'Asia/Kolkata'), ('acct_utc', 'UTC', 'UTC')`)
	testenv.Must(t, err, "insert accounts")
	evs := slices.Clone(rebuildEvents)
	for i := range evs {
		evs[i].id = uuid.New()
	}
	insertRebuildEvents(t, ch, evs)
	return pg, ch, evs
}

func insertRebuildEvents(t *testing.T, ch *testenv.ClickHouse, evs []rebuildEvent) {
	t.Helper()
	b, err := ch.Conn.PrepareBatch(context.Background(), `INSERT INTO usage_events (event_id, schema_version, account_id,
		environment, key_id, event_type, timestamp, timestamp_us, route, method, status, response_bytes, units,
		kafka_partition, kafka_offset, ingested_at)`)
	testenv.Must(t, err, "prepare insert")
	for i, e := range evs {
		at := mustTime(t, e.at)
		testenv.Must(t, b.Append(e.id, uint8(1), e.account, e.env, "key_1", e.typ, at, uint64(at.UnixMicro()),
			e.route, "GET", uint16(200), uint64(e.bytes), int64(1), int32(0), int64(i), time.Now().UTC()), "append event")
	}
	testenv.Must(t, b.Send(), "insert events")
}

// TestTheAggregatorRollsUpAConfigMeterThatIsNewOrChanged starts the
// aggregator over raw events that landed before its configuration named a
// meter: it computes the new meter's rollups from them; restarted with the
// meter narrowed, it replaces them (the wider rows would otherwise stay
// beside the new ones).
func TestTheAggregatorRollsUpAConfigMeterThatIsNewOrChanged(t *testing.T) {
	pg, ch, evs := landRebuildEvents(t)
	ctx := context.Background()

	byRoute := rebuildMeters[1]
	run := func(step string, meters []meter.Meter, want map[rollupKey]rollupVal) {
		t.Helper()
		cfg := testConfig(t, pg, ch, "unused")
		cfg.Meters = meters
		cfg.Aggregator.MetersRefresh = 100 * time.Millisecond
		var started time.Time
		testenv.Must(t, pg.Pool.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&started), "read Postgres's clock")
		m, err := NewAggregateMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start the aggregator")
		runCtx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- m.Run(runCtx) }()
		defer func() {
			stop()
			<-done
			_ = m.Close()
		}()
		deadline := time.Now().Add(60 * time.Second)
		for {
			var recorded int
			testenv.Must(t, pg.Pool.QueryRow(ctx, "SELECT count(*) FROM config_meters WHERE rolled_up_at >= $1", started).Scan(&recorded), "read config meters")
			if recorded == len(meters) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		compareRollups(t, step, readRollups(t, ch), want)
	}

	onlyMeter := func(want map[rollupKey]rollupVal, key string) map[rollupKey]rollupVal {
		out := maps.Clone(want)
		maps.DeleteFunc(out, func(k rollupKey, _ rollupVal) bool { return k.meter != key })
		return out
	}
	all := expectedRollups(t, evs)
	run("a meter new to the configuration", []meter.Meter{byRoute}, onlyMeter(all, byRoute.Key))

	// The same meter on /v1/b alone: every /v1/a row must go.
	narrowed := byRoute
	narrowed.Filters = []meter.Filter{{Property: "route", Values: []string{"/v1/b"}}}
	var onB []rebuildEvent
	for _, e := range evs {
		if e.route == "/v1/b" {
			onB = append(onB, e)
		}
	}
	want := onlyMeter(expectedRollups(t, onB), byRoute.Key)
	run("a meter whose definition changed", []meter.Meter{narrowed}, want)
	var def []byte
	testenv.Must(t, pg.Pool.QueryRow(ctx, "SELECT definition FROM config_meters WHERE key = $1", byRoute.Key).Scan(&def), "read the recorded definition")
	if !strings.Contains(string(def), "/v1/b") {
		t.Errorf("recorded definition %s, want the narrowed one", def)
	}
}

// TestAggregateRebuildStoppedAfterItsDeletionSaysToRebuildAgain stops a
// real `tollgate aggregate rebuild` process by SIGINT and by SIGTERM once it
// has deleted the rollups it replaces: it must exit non-zero and print the
// rebuild to run again, which brings every row back. (Without signal
// handling the process died at once, saying nothing, and the range stayed
// empty.)
func TestAggregateRebuildStoppedAfterItsDeletionSaysToRebuildAgain(t *testing.T) {
	pg, ch, evs := landRebuildEvents(t)
	bin := tollgateBinary(t)
	cfgPath := filepath.Join(t.TempDir(), "tollgate.yaml")
	testenv.Must(t, os.WriteFile(cfgPath, []byte("# every default\n"), 0o600), "write config")
	t.Setenv("TOLLGATE_POSTGRES_URL", pg.URL)
	t.Setenv("TOLLGATE_CLICKHOUSE_ADDR", ch.Addr)
	t.Setenv("TOLLGATE_CLICKHOUSE_DATABASE", ch.Database)
	want := expectedRollups(t, evs)
	maps.DeleteFunc(want, func(k rollupKey, _ rollupVal) bool { return k.meter != "api_calls" })
	runTollgate(t, "aggregate", "rebuild", "--config", cfgPath, "--log-level", "error")
	compareRollups(t, "before", readRollups(t, ch), want)

	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String()+" after the deletion exits non-zero with the rebuild to run again", func(t *testing.T) {
			// Forty years of months to walk through: the rebuild is still
			// running when the signal comes.
			cmd := exec.Command(bin, "aggregate", "rebuild", "--config", cfgPath,
				"--from", "2000-01-01T00:00:00Z", "--to", "2040-01-01T00:00:00Z")
			stderr, err := cmd.StderrPipe()
			testenv.Must(t, err, "pipe stderr")
			testenv.Must(t, cmd.Start(), "start the rebuild")
			var out strings.Builder
			sc := bufio.NewScanner(stderr)
			signalled := false
			for sc.Scan() {
				out.WriteString(sc.Text() + "\n")
				if !signalled && strings.Contains(sc.Text(), "deleted the rollups to rebuild") {
					testenv.Must(t, cmd.Process.Signal(sig), "signal the rebuild")
					signalled = true
				}
			}
			err = cmd.Wait()
			if !signalled {
				t.Fatalf("the rebuild never said it deleted the rollups:\n%s", out.String())
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("the rebuild ended with %v, want exit status 1 (finished before the signal, or killed by it):\n%s", err, out.String())
			}
			text := out.String()
			if !strings.Contains(text, "after it deleted the rollups of api_calls") {
				t.Fatalf("the rebuild does not say it deleted rollups:\n%s", text)
			}
			again := regexp.MustCompile(`(?m)^  tollgate (aggregate rebuild .*)$`).FindStringSubmatch(text)
			if again == nil {
				t.Fatalf("the rebuild does not print the command to run again:\n%s", text)
			}
			if got := readRollups(t, ch); len(got) >= len(want) {
				t.Fatalf("%d rollup rows after the interruption; the test did not interrupt the rebuild it meant to", len(got))
			}
			args := append(strings.Fields(again[1]), "--config", cfgPath, "--log-level", "error")
			runTollgate(t, args...)
			compareRollups(t, "after the printed rebuild", readRollups(t, ch), want)
		})
	}
	// Killed after its deletion, the rebuild cannot say so itself: it
	// recorded the deletion in Postgres first, so the usage API reports
	// the meter as backfilling and an aggregator that starts names the
	// rebuild to run again; running it settles the record. Before, nothing
	// was left to tell that the range had been emptied.
	t.Run("SIGKILL after the deletion leaves the rebuild recorded until it is run again", func(t *testing.T) {
		ctx := context.Background()
		cmd := exec.Command(bin, "aggregate", "rebuild", "--config", cfgPath,
			"--from", "2000-01-01T00:00:00Z", "--to", "2040-01-01T00:00:00Z")
		stderr, err := cmd.StderrPipe()
		testenv.Must(t, err, "pipe stderr")
		testenv.Must(t, cmd.Start(), "start the rebuild")
		sc := bufio.NewScanner(stderr)
		killed := false
		for sc.Scan() {
			if !killed && strings.Contains(sc.Text(), "deleted the rollups to rebuild") {
				testenv.Must(t, cmd.Process.Kill(), "kill -9 the rebuild")
				killed = true
			}
		}
		_ = cmd.Wait()
		if !killed {
			t.Fatal("the rebuild never said it deleted the rollups")
		}
		if got := readRollups(t, ch); len(got) >= len(want) {
			t.Fatalf("%d rollup rows after the kill; the test did not kill the rebuild it meant to", len(got))
		}
		meters := aggpg.NewMeters(pg.Pool)
		pending, err := meters.PendingRebuilds(ctx)
		testenv.Must(t, err, "read pending rebuilds")
		if len(pending) != 1 || !slices.Equal(pending[0].Meters, []string{"api_calls"}) ||
			!pending[0].From.Equal(mustTime(t, "2000-01-01T00:00:00Z")) || !pending[0].To.Equal(mustTime(t, "2040-01-01T00:00:00Z")) {
			t.Fatalf("pending rebuilds %+v, want the killed one: api_calls over [2000, 2040)", pending)
		}
		// No configured meters: the file's own roll-up state aside.
		unfinished, err := meters.Unfinished(ctx, nil)
		testenv.Must(t, err, "read unfinished meters")
		if !unfinished["api_calls"] {
			t.Fatalf("meters reported as backfilling: %v, want api_calls, whose rows the killed rebuild deleted", unfinished)
		}
		logs := &testenv.LogBuffer{}
		cfg := testConfig(t, pg, ch, "unused")
		m, err := NewAggregateMain(ctx, cfg, slog.New(slog.NewTextHandler(logs, nil)))
		testenv.Must(t, err, "start the aggregator")
		stop := runComponent(t, m)
		testenv.Wait(t, 10*time.Second, "the aggregator to name the rebuild to run again", func() bool {
			return logs.Contains("never recorded them rebuilt") && logs.Contains("tollgate aggregate rebuild --from 2000-01-01T00:00:00Z --to 2040-01-01T00:00:00Z --meter api_calls")
		})
		stop()
		_ = m.Close()
		runTollgate(t, "aggregate", "rebuild", "--config", cfgPath, "--log-level", "error",
			"--from", "2000-01-01T00:00:00Z", "--to", "2040-01-01T00:00:00Z", "--meter", "api_calls")
		compareRollups(t, "after the rebuild was run again", readRollups(t, ch), want)
		if pending, err := meters.PendingRebuilds(ctx); err != nil || len(pending) != 0 {
			t.Fatalf("pending rebuilds %+v (%v) after it was run again, want none", pending, err)
		}
		if unfinished, err := meters.Unfinished(ctx, nil); err != nil || unfinished["api_calls"] {
			t.Fatalf("meters reported as backfilling after the rebuild ran again: %v (%v)", unfinished, err)
		}
	})
}

// TestAReusedMeterKeyHasItsOldRowsReplaced gives a key that already has
// rollups a narrower definition, both ways a key can be reused: a meter
// created through the admin API that the configuration file then defines
// differently, and a meter of the file removed from it and created through
// the admin API anew. Rebuilt rows replace stored ones only where they
// count at least as many events, so without a deletion first the wider
// definition's rows stayed.
// Its last case is an admin-API meter's backfill cut short: the next
// aggregator to start finishes it.
func TestAReusedMeterKeyHasItsOldRowsReplaced(t *testing.T) {
	wide := rebuildMeters[1]
	narrow := wide
	narrow.Filters = []meter.Filter{{Property: "route", Values: []string{"/v1/b"}}}
	sum := sha256.Sum256([]byte("admin-token"))

	// startEvery runs the aggregator with meters as its configuration,
	// re-reading the stored meters every refresh (a backfill's second pass
	// comes 2 s after that), serving the admin API, until the test ends.
	startEvery := func(t *testing.T, pg *testenv.Postgres, ch *testenv.ClickHouse, meters []meter.Meter, refresh time.Duration) *AggregateMain {
		t.Helper()
		cfg := testConfig(t, pg, ch, "unused")
		cfg.Meters = meters
		cfg.Aggregator.MetersRefresh = refresh
		cfg.Aggregator.AdminTokenSHA256 = hex.EncodeToString(sum[:])
		ctx, cancel := context.WithCancel(context.Background())
		m, err := NewAggregateMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start the aggregator")
		done := make(chan error, 1)
		go func() { done <- m.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			<-done
			_ = m.Close()
		})
		return m
	}
	start := func(t *testing.T, pg *testenv.Postgres, ch *testenv.ClickHouse, meters []meter.Meter) *AggregateMain {
		t.Helper()
		return startEvery(t, pg, ch, meters, 100*time.Millisecond)
	}
	create := func(t *testing.T, m *AggregateMain, mt meter.Meter) {
		t.Helper()
		body, err := json.Marshal(mt)
		testenv.Must(t, err, "encode meter")
		req, err := http.NewRequest(http.MethodPost, "http://"+m.Addr()+"/admin/v1/meters", bytes.NewReader(body))
		testenv.Must(t, err, "request")
		req.Header.Set("Authorization", "Bearer admin-token")
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "create meter")
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("create meter %s: status %d, want 201", mt.Key, resp.StatusCode)
		}
	}
	// await waits until the rollups are want, then compares them.
	await := func(t *testing.T, ch *testenv.ClickHouse, step string, want map[rollupKey]rollupVal) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if maps.Equal(readRollups(t, ch), want) {
				break
			}
		}
		compareRollups(t, step, readRollups(t, ch), want)
	}
	rowsOf := func(evs []rebuildEvent, mt meter.Meter) map[rollupKey]rollupVal {
		var kept []rebuildEvent
		for _, e := range evs {
			if len(mt.Filters) == 0 || slices.Contains(mt.Filters[0].Values, e.route) {
				kept = append(kept, e)
			}
		}
		out := expectedRollups(t, kept)
		maps.DeleteFunc(out, func(k rollupKey, _ rollupVal) bool { return k.meter != mt.Key })
		return out
	}

	// recorded waits until the key's rollups are recorded as computed under
	// mt's definition (a configured meter's second pass, or a stored one's
	// backfill, has ended), so the aggregator can be stopped.
	recorded := func(t *testing.T, pg *testenv.Postgres, mt meter.Meter) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			var b []byte
			err := pg.Pool.QueryRow(context.Background(), "SELECT definition FROM config_meters WHERE key = $1", mt.Key).Scan(&b)
			var got meter.Meter
			if err == nil && json.Unmarshal(b, &got) == nil && meter.Equal(got, mt) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the rollups of %s never recorded as computed under %+v (last: %s, %v)", mt.Key, mt, b, err)
			}
		}
	}
	// configured runs an aggregator with mt as the configuration's meter
	// until its rollups are computed and recorded under mt (its second
	// pass would write them again), then stops it.
	configured := func(t *testing.T, pg *testenv.Postgres, ch *testenv.ClickHouse, evs []rebuildEvent, mt meter.Meter) {
		t.Helper()
		m := start(t, pg, ch, []meter.Meter{mt})
		await(t, ch, "the configured meter", rowsOf(evs, mt))
		recorded(t, pg, mt)
		testenv.Must(t, m.Close(), "stop the aggregator")
	}

	t.Run("a configured meter over an admin-API meter's rows has only its own", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		admin := start(t, pg, ch, nil)
		create(t, admin, wide)
		await(t, ch, "the admin-API meter", rowsOf(evs, wide))
		testenv.Must(t, admin.Close(), "stop the aggregator")

		start(t, pg, ch, []meter.Meter{narrow})
		await(t, ch, "the configured meter under the same key", rowsOf(evs, narrow))
	})

	t.Run("an admin-API meter over a removed configured meter's rows has only its own", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		configured(t, pg, ch, evs, wide)

		admin := start(t, pg, ch, nil)
		create(t, admin, narrow)
		await(t, ch, "the admin-API meter under the same key", rowsOf(evs, narrow))
	})

	// An admin-API meter is recorded as backfilled only once both passes
	// have run; an aggregator stopped between them, whose first pass (had
	// it been cut short after its deletion) would have left rows
	// unwritten, leaves the backfill to the next aggregator to start.
	// Before, nothing backfilled it again and its past stayed empty.
	t.Run("an admin-API meter whose backfill was cut short is backfilled by the next aggregator", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		ctx := context.Background()
		backfilledAt := func() *time.Time {
			var at *time.Time
			testenv.Must(t, pg.Pool.QueryRow(ctx, "SELECT backfilled_at FROM meters WHERE key = $1", wide.Key).Scan(&at), "read the meter's backfill")
			return at
		}
		// A second pass 32 s after the first: the aggregator is stopped
		// between the two.
		first := startEvery(t, pg, ch, nil, 30*time.Second)
		create(t, first, wide)
		await(t, ch, "the meter after its first pass", rowsOf(evs, wide))
		testenv.Must(t, first.Close(), "stop the aggregator") // waits for its backfill to stop
		if at := backfilledAt(); at != nil {
			t.Fatalf("meter recorded as backfilled at %s by an aggregator stopped before its second pass", at)
		}
		// What a first pass cut short after its deletion leaves.
		testenv.Must(t, aggch.NewStore(ch.Conn).DeleteRollups(ctx, []string{wide.Key}, time.Unix(0, 0), time.Now().AddDate(1, 0, 0)), "delete the meter's rollups")
		if n := len(readRollups(t, ch)); n != 0 {
			t.Fatalf("%d rollup rows left after the deletion", n)
		}

		start(t, pg, ch, nil)
		await(t, ch, "the meter after the next aggregator started", rowsOf(evs, wide))
		for deadline := time.Now().Add(30 * time.Second); backfilledAt() == nil; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the next aggregator never recorded the meter as backfilled")
			}
		}
	})

	// A backfill's first pass deletes the meter's rows, so a backfill
	// another aggregator claimed after this one started may have deleted
	// what this one wrote: this one's finish is not recorded, the later
	// claim's is; and this one, not yet at its deletion, deletes nothing.
	t.Run("a backfill another aggregator took over does not record its finish", func(t *testing.T) {
		pg, _, _ := landRebuildEvents(t)
		ctx := context.Background()
		meters := aggpg.NewMeters(pg.Pool)
		_, err := meters.Create(ctx, wide)
		testenv.Must(t, err, "store the meter")
		earlier, later := uuid.New(), uuid.New()
		for _, c := range []uuid.UUID{earlier, later} {
			ok, err := meters.ClaimBackfill(ctx, wide, c)
			testenv.Must(t, err, "claim the backfill")
			if !ok {
				t.Fatal("claim of an unfinished backfill refused")
			}
		}
		// The earlier backfill checks its claim before it deletes rows.
		if ok, err := meters.ClaimStands(ctx, wide.Key, earlier); err != nil || ok {
			t.Fatalf("the earlier claim stands (%v, %v) after a later one, want not", ok, err)
		}
		if ok, err := meters.ClaimStands(ctx, wide.Key, later); err != nil || !ok {
			t.Fatalf("the later claim does not stand (%v, %v)", ok, err)
		}
		if ok, err := meters.Backfilled(ctx, wide.Key, earlier); err != nil || ok {
			t.Fatalf("the earlier claim's finish recorded (%v, %v), want refused", ok, err)
		}
		if ok, err := meters.Backfilled(ctx, wide.Key, later); err != nil || !ok {
			t.Fatalf("the later claim's finish not recorded (%v, %v)", ok, err)
		}
		if ok, err := meters.ClaimBackfill(ctx, wide, uuid.New()); err != nil || ok {
			t.Fatalf("claim of a finished backfill (%v, %v), want refused", ok, err)
		}
		unfinished, err := meters.Unbackfilled(ctx)
		testenv.Must(t, err, "list unfinished backfills")
		if len(unfinished) != 0 {
			t.Fatalf("unfinished backfills %v after the finish, want none", unfinished)
		}
	})

	// The record of what a key's rows were computed under follows the key
	// between the configuration file and the admin API. Before, it was
	// written for the file's meters alone and never cleared, so each of
	// these kept the other definition's rows (or none), with no flag.
	t.Run("a configured meter back in the file over an admin-API meter's rows has only its own", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		configured(t, pg, ch, evs, wide)
		admin := start(t, pg, ch, nil)
		create(t, admin, narrow)
		await(t, ch, "the admin-API meter under the key", rowsOf(evs, narrow))
		recorded(t, pg, narrow)
		testenv.Must(t, admin.Close(), "stop the aggregator")
		start(t, pg, ch, []meter.Meter{wide})
		await(t, ch, "the configured meter back in the file", rowsOf(evs, wide))
	})
	t.Run("a stored meter the file no longer shadows is backfilled again", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		admin := start(t, pg, ch, nil)
		create(t, admin, narrow)
		await(t, ch, "the admin-API meter", rowsOf(evs, narrow))
		recorded(t, pg, narrow)
		testenv.Must(t, admin.Close(), "stop the aggregator")
		configured(t, pg, ch, evs, wide)
		start(t, pg, ch, nil)
		await(t, ch, "the stored meter in force again", rowsOf(evs, narrow))
		recorded(t, pg, narrow)
	})
	t.Run("a configured meter put back unchanged counts what landed while it was gone", func(t *testing.T) {
		pg, ch, evs := landRebuildEvents(t)
		configured(t, pg, ch, evs, wide)
		without := start(t, pg, ch, nil)
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			var n int
			testenv.Must(t, pg.Pool.QueryRow(context.Background(), "SELECT count(*) FROM config_meters WHERE key = $1", wide.Key).Scan(&n), "read config meters")
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the aggregator started without the meter never forgot its record")
			}
		}
		more := slices.Clone(evs)
		for i := range more {
			more[i].id = uuid.New()
		}
		insertRebuildEvents(t, ch, more) // land while no meter counts them
		testenv.Must(t, without.Close(), "stop the aggregator")
		start(t, pg, ch, []meter.Meter{wide})
		await(t, ch, "the meter put back", rowsOf(slices.Concat(evs, more), wide))
	})
}
