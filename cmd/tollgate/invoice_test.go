package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/segmentio/kafka-go"
	"github.com/shopspring/decimal"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	"github.com/tollgate-dev/tollgate/invoicer/stripe/stripetest"
	"github.com/tollgate-dev/tollgate/schemas"
)

// tollgateBinary builds the command into the test's temporary directory,
// so crash tests can kill -9 a real invoicer process.
func tollgateBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tollgate")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// meteredPlan prices every call, so small test traffic gives amounts with
// rounding: 5.00 a period plus 1.5 cents a call.
const meteredPlan = `{"limits": {"requests_per_second": 100, "burst": 200, "monthly_requests": null},
  "prices": [
    {"key": "base", "description": "Platform fee", "model": "flat", "amount": 500},
    {"key": "api_calls", "description": "API calls", "model": "per_unit", "meter": "api_calls", "unit_amount": "1.5"}
  ]}`

func meteredTotal(calls int64) int64 {
	return 500 + decimal.NewFromInt(calls).Mul(decimal.RequireFromString("1.5")).RoundBank(0).IntPart()
}

// billingDB prepares accounts on the metered plan, created at period start.
func billingDB(t *testing.T, pg *testenv.Postgres, periodStart time.Time, accounts map[string]string) {
	t.Helper()
	ctx := context.Background()
	_, err := pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('metered', 1, 'Metered', 'usd', $1)`, meteredPlan)
	testenv.Must(t, err, "insert plan")
	for id, plan := range accounts {
		_, err := pg.Pool.Exec(ctx, `INSERT INTO accounts (id, name, email, created_at) VALUES ($1, $1, $1 || '@example.test', $2)`, id, periodStart)
		testenv.Must(t, err, "insert account")
		_, err = pg.Pool.Exec(ctx, `INSERT INTO environments (account_id, mode) VALUES ($1, 'live'), ($1, 'test')`, id)
		testenv.Must(t, err, "insert environments")
		if plan != "free" {
			_, err = pg.Pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at) VALUES ($1, $2, $3, 1, $4)`,
				"sub_"+id, id, plan, periodStart.AddDate(-1, 0, 0))
			testenv.Must(t, err, "insert subscription")
		}
	}
}

// setWatermark writes the aggregator's watermark for every partition, with
// an updated_at ahead of anything ingest writes, so it wins the replace.
func setWatermark(t *testing.T, ch *testenv.ClickHouse, at time.Time) {
	t.Helper()
	b, err := ch.Conn.PrepareBatch(context.Background(), "INSERT INTO watermarks (partition, watermark, updated_at)")
	testenv.Must(t, err, "prepare watermark")
	for p := int32(0); p < 4; p++ {
		testenv.Must(t, b.Append(p, at.UTC(), time.Now().Add(24*time.Hour).UTC()), "append watermark")
	}
	testenv.Must(t, b.Send(), "write watermark")
}

func insertCalls(t *testing.T, ch *testenv.ClickHouse, account, env string, at time.Time, n int) {
	t.Helper()
	b, err := ch.Conn.PrepareBatch(context.Background(), `INSERT INTO usage_events (event_id, schema_version, account_id,
		environment, key_id, event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)`)
	testenv.Must(t, err, "prepare insert")
	for i := 0; i < n; i++ {
		ts := at.Add(time.Duration(i) * time.Second)
		testenv.Must(t, b.Append(uuid.New(), uint8(1), account, env, "key_1", "api_call", ts.UTC().Truncate(time.Second),
			uint64(ts.UnixMicro()), int64(1), int32(0), int64(i), time.Now().UTC()), "append")
	}
	testenv.Must(t, b.Send(), "insert calls")
}

// TestInvoicerKilledAfterEachStripeStepResumesToExactlyOneInvoice runs the
// real invoicer as a process against a stateful Stripe fake, kills it with
// SIGKILL at each Stripe step (after Stripe acted but before the invoicer
// heard back, or before a call), restarts it, and checks Stripe ends with
// exactly one finalized invoice carrying exactly the ledger's lines. Each
// step is run twice: resumed at once (Stripe still holds the idempotency
// keys), and resumed after Stripe has forgotten them (about 24 hours on),
// when only finding the objects by their metadata keeps a line from being
// charged twice.
func TestInvoicerKilledAfterEachStripeStepResumesToExactlyOneInvoice(t *testing.T) {
	bin := tollgateBinary(t)
	period := invoicer.MonthPeriod(time.Now().AddDate(0, -2, 0), time.UTC)
	var cases []struct {
		name, kind, phase string
		expired           bool
	}
	for _, c := range []struct{ name, kind, phase string }{
		{"killed after stripe created the customer", "customer", "after"},
		{"killed after stripe created the invoice", "invoice", "after"},
		{"killed after stripe created the first item", "item", "after"},
		{"killed before finalize", "finalize", "before"},
		{"killed after stripe finalized", "finalize", "after"},
	} {
		for _, expired := range []bool{false, true} {
			name := c.name
			if expired {
				name += ", resumed after the keys expired"
			}
			cases = append(cases, struct {
				name, kind, phase string
				expired           bool
			}{name, c.kind, c.phase, expired})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
			billingDB(t, pg, period.Start, map[string]string{"acct_crash": "metered"})
			insertCalls(t, ch, "acct_crash", "live", period.Start.Add(time.Hour), 151)
			insertCalls(t, ch, "acct_crash", "test", period.Start.Add(time.Hour), 40) // never billed
			setWatermark(t, ch, period.End.Add(2*time.Hour))
			fake := stripetest.New()
			defer fake.Close()

			env := testenv.ChildEnv(
				"TOLLGATE_POSTGRES_URL="+pg.URL, "TOLLGATE_CLICKHOUSE_ADDR="+ch.Addr,
				"TOLLGATE_CLICKHOUSE_DATABASE="+ch.Database, "TOLLGATE_STRIPE_API_KEY=sk_test_crash",
				"TOLLGATE_STRIPE_API_URL="+fake.URL, "TOLLGATE_INVOICER_LISTEN=127.0.0.1:0")
			run := func(kill bool) error {
				cmd := exec.Command(bin, "invoice", "close", "--log-level", "error")
				cmd.Env = env
				var stderr strings.Builder
				cmd.Stderr = &stderr
				var once sync.Once
				// The hook runs on the fake's goroutine: it gets the process
				// through proc, set once Start has returned.
				var proc atomic.Pointer[os.Process]
				fake.SetHook(nil)
				if kill {
					fake.SetHook(func(kind, phase string) {
						if kind == c.kind && phase == c.phase {
							once.Do(func() {
								for p := proc.Load(); ; p = proc.Load() {
									if p != nil {
										_ = p.Signal(syscall.SIGKILL)
										return
									}
									time.Sleep(time.Millisecond)
								}
							})
						}
					})
				}
				testenv.Must(t, cmd.Start(), "start invoicer")
				proc.Store(cmd.Process)
				err := cmd.Wait()
				if err != nil && !kill {
					return fmt.Errorf("%v: %s", err, stderr.String())
				}
				return err
			}
			err := run(true)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("the invoicer was not killed at %s/%s: %v", c.kind, c.phase, err)
			}
			if c.expired {
				fake.ForgetIdempotencyKeys()
			}
			testenv.Must(t, run(false), "restarted invoicer")
			testenv.Must(t, run(false), "a third run (nothing left to do)")

			invs := fake.Invoices()
			if len(invs) != 1 {
				t.Fatalf("stripe has %d invoices, want exactly 1", len(invs))
			}
			stored, err := invpg.New(pg.Pool).AccountInvoices(context.Background(), "acct_crash")
			testenv.Must(t, err, "list ledger invoices")
			if len(stored) != 1 {
				t.Fatalf("ledger has %d invoices, want 1", len(stored))
			}
			led, si := stored[0], invs[0]
			if want := meteredTotal(151); led.Total != want {
				t.Errorf("ledger total %d, want %d", led.Total, want)
			}
			if si.Status != "open" || si.AmountDue != led.Total || si.Metadata["tollgate_invoice_id"] != led.ID {
				t.Errorf("stripe invoice %+v does not match ledger %s total %d", si, led.ID, led.Total)
			}
			if len(si.Items) != len(led.Lines) {
				t.Fatalf("stripe has %d items, ledger %d lines", len(si.Items), len(led.Lines))
			}
			for i, l := range led.Lines {
				if si.Items[i].Amount != l.Amount || si.Items[i].Metadata["tollgate_line_no"] != fmt.Sprint(l.No) {
					t.Errorf("item %d: %d (line %s), ledger line %d: %d", i, si.Items[i].Amount, si.Items[i].Metadata["tollgate_line_no"], l.No, l.Amount)
				}
			}
			if fake.Customers() != 1 {
				t.Errorf("stripe has %d customers, want 1", fake.Customers())
			}
			if led.Status != invoicer.StatusSynced || led.HostedURL == "" {
				t.Errorf("ledger status %s, hosted %q", led.Status, led.HostedURL)
			}
			for _, call := range fake.Calls() {
				switch call.Kind {
				case "customer", "invoice", "item", "finalize":
					if call.IdempotencyKey == "" {
						t.Errorf("a %s call carried no idempotency key", call.Kind)
					}
				}
			}
		})
	}
}

// TestStripeMockAcceptsTheInvoicerRequests runs the whole sync against
// stripe-mock, which validates every request against Stripe's API spec.
func TestStripeMockAcceptsTheInvoicerRequests(t *testing.T) {
	mock := testenv.RequireStripeMock(t)
	period := invoicer.MonthPeriod(time.Now().AddDate(0, -2, 0), time.UTC)
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	billingDB(t, pg, period.Start, map[string]string{"acct_mock": "metered", "acct_mock2": "metered"})
	insertCalls(t, ch, "acct_mock", "live", period.Start.Add(time.Hour), 10)
	setWatermark(t, ch, period.End.Add(2*time.Hour))
	cfg := testConfig(t, pg, ch, "unused")
	cfg.Invoicer.Stripe.APIKey, cfg.Invoicer.Stripe.APIURL = "sk_test_mock", mock
	iv, pool, conn, err := newInvoicer(context.Background(), cfg, nil, quietLog())
	testenv.Must(t, err, "new invoicer")
	defer pool.Close()
	defer conn.Close()
	testenv.Must(t, iv.Once(context.Background()), "close and sync against stripe-mock")
	var synced int
	testenv.Must(t, pg.Pool.QueryRow(context.Background(), `SELECT count(*) FROM ledger_entries WHERE kind = 'invoice.synced'`).Scan(&synced), "count")
	if synced != 2 {
		t.Fatalf("synced invoices: %d, want 2", synced)
	}
}

// replayTimes places TestReplayProvesEveryInvoiceAndNamesAnAlteredOne's
// traffic for the wall-clock time now: prev is the period the invoicer
// (on the wall clock) closes, current the time of the calls of the current
// period, and watermark the usage watermark the test reports. The
// watermark is now, but never less than the current period's start plus
// the grace: in a period's first hour (the default grace) a watermark of
// now leaves the previous period open, and nothing is closed. The calls of
// the current period are a second before now, but never before its start,
// where they would be billed in prev.
func replayTimes(now time.Time, grace time.Duration) (prev invoicer.Period, current, watermark time.Time) {
	cur := invoicer.MonthPeriod(now, time.UTC)
	prev = invoicer.MonthPeriod(cur.Start.Add(-time.Second), time.UTC)
	current = now.Add(-time.Second)
	if current.Before(cur.Start) {
		current = cur.Start
	}
	watermark = now
	if due := prev.End.Add(grace); watermark.Before(due) {
		watermark = due
	}
	return prev, current, watermark
}

func TestReplayTimesCloseThePreviousPeriodAtAnyTime(t *testing.T) {
	const grace = time.Hour // the default
	check := func(now time.Time) {
		prev, current, wm := replayTimes(now, grace)
		cur := invoicer.MonthPeriod(now, time.UTC)
		switch {
		case !prev.End.Equal(cur.Start) || !prev.Start.Equal(invoicer.MonthPeriod(cur.Start.Add(-time.Second), time.UTC).Start):
			t.Fatalf("now %s: prev %s..%s is not the period before now's", now.Format(time.RFC3339), prev.Start, prev.End)
		case current.Before(cur.Start) || current.After(now.Add(time.Second)) || current.Before(now.Add(-time.Second)):
			t.Fatalf("now %s: the current period's calls at %s", now.Format(time.RFC3339), current.Format(time.RFC3339Nano))
		case prev.End.Add(grace).After(wm.Truncate(time.Second)) || wm.Before(now) || !wm.Before(cur.End.Add(grace)):
			// Due when the watermark, in the whole seconds the watermarks
			// table keeps, is at least the period's end plus the grace.
			t.Fatalf("now %s: watermark %s does not close prev alone", now.Format(time.RFC3339), wm.Format(time.RFC3339Nano))
		}
	}
	for _, first := range []string{"2026-01-01", "2026-03-01", "2026-05-01", "2026-12-01", "2028-03-01"} {
		d, err := time.Parse(time.DateOnly, first)
		testenv.Must(t, err, "parse")
		for m := -24 * 60; m < 24*60; m++ {
			check(d.Add(time.Duration(m)*time.Minute + 17*time.Second))
		}
		for s := -3 * time.Second; s < 3*time.Second; s += 100 * time.Millisecond {
			check(d.Add(s))
			check(d.Add(grace + s))
		}
	}
}

func quietLog() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func testConfig(t *testing.T, pg *testenv.Postgres, ch *testenv.ClickHouse, topic string) Config {
	t.Helper()
	cfg, err := LoadConfig("")
	testenv.Must(t, err, "load config")
	cfg.Services.PostgresURL = pg.URL
	cfg.Services.ClickHouseAddr = ch.Addr
	cfg.Services.ClickHouseDatabase = ch.Database
	cfg.Services.KafkaBrokers = testenv.KafkaBrokers()
	cfg.Edge.Listen, cfg.Aggregator.Listen, cfg.Invoicer.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Ingest.Topic = topic
	cfg.Ingest.DeadLetter = topic + ".dlq"
	cfg.Ingest.Group = topic + ".ingest"
	cfg.Ingest.BatchWait = 50 * time.Millisecond
	cfg.Ingest.MetricsListen = ""
	testenv.Must(t, cfg.Validate("invoice", "ingest"), "validate config")
	return cfg
}

// TestReplayProvesEveryInvoiceAndNamesAnAlteredOne produces generated
// traffic to a Kafka topic, lands it with the real ingest, closes the
// period, replays the topic into a scratch database and expects zero
// difference; then alters one raw event in the scratch copy and expects the
// replay to name exactly that account's invoice.
func TestReplayProvesEveryInvoiceAndNamesAnAlteredOne(t *testing.T) {
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 4)
	testenv.CreateTopic(t, topic+".dlq", 4) // dead letters keep their source partition
	cfg := testConfig(t, pg, ch, topic)

	now := time.Now().UTC()
	prev, current, watermark := replayTimes(now, cfg.Invoicer.Grace)
	// Event times within ingest's allowed lateness of their record time.
	lo := prev.Start
	if min := now.Add(-30 * 24 * time.Hour); lo.Before(min) {
		lo = min
	}
	span := prev.End.Sub(lo)
	accounts := map[string]string{"acct_a": "metered", "acct_b": "free", "acct_c": "metered"}
	billingDB(t, pg, prev.Start, accounts)

	rng := rand.New(rand.NewPCG(7, 11))
	want := map[string]int64{}
	var msgs []kafka.Message
	var unique int
	var counted []byte // a billed call of acct_c, retried after the close below
	for _, acct := range []string{"acct_a", "acct_b", "acct_c"} {
		n := 100 + rng.IntN(300)
		for i := 0; i < n; i++ {
			env, typ := schemas.Live, "api_call"
			switch {
			case i%10 == 3:
				env = schemas.Test // metered, never billed
			case i%17 == 5:
				typ = "report.generated" // not the api_calls meter
			}
			ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: env, KeyID: "key_" + acct,
				Type: typ, Time: lo.Add(time.Duration(rng.Int64N(int64(span)))), Units: 1, Route: "/v1/items", Method: "GET", Status: 200}
			b, err := ev.Encode()
			testenv.Must(t, err, "encode")
			msgs = append(msgs, kafka.Message{Key: []byte(acct), Value: b})
			unique++
			if env == schemas.Live && typ == "api_call" {
				want[acct]++
				if acct == "acct_c" && counted == nil {
					counted = b
				}
			}
			if i%25 == 0 { // a redelivered duplicate
				msgs = append(msgs, kafka.Message{Key: []byte(acct), Value: b})
			}
		}
		// Calls of the current period: in the topic, not in the closed period.
		ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: schemas.Live, KeyID: "key_" + acct,
			Type: "api_call", Time: current, Units: 1}
		b, _ := ev.Encode()
		msgs = append(msgs, kafka.Message{Key: []byte(acct), Value: b})
		unique++
	}
	msgs = append(msgs, kafka.Message{Key: []byte("acct_a"), Value: []byte(`{"not":"an event"}`)})
	w := &kafka.Writer{Addr: kafka.TCP(cfg.Services.KafkaBrokers...), Topic: topic, Balancer: &kafka.Hash{},
		RequiredAcks: kafka.RequireAll, BatchTimeout: 10 * time.Millisecond}
	testenv.Must(t, w.WriteMessages(ctx, msgs...), "produce")
	testenv.Must(t, w.Close(), "close producer")

	ing, err := NewIngestMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "start ingest")
	ictx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- ing.Run(ictx) }()
	t.Cleanup(func() { stop(); <-done; _ = ing.Close() })
	waitLanded(t, ch, uint64(unique))

	setWatermark(t, ch, watermark)
	res := closeDue(t, cfg)
	if len(res.Closed) != 3 {
		t.Fatalf("closed %d invoices, want 3", len(res.Closed))
	}
	var altered string
	for _, inv := range res.Closed {
		exp := meteredTotal(want[inv.AccountID])
		if accounts[inv.AccountID] == "free" {
			exp = 0
		}
		if inv.Total != exp || inv.Fingerprint.Segments[0].Quantities["api_calls"] != want[inv.AccountID] {
			t.Errorf("%s: total %d calls %d, want %d and %d", inv.AccountID, inv.Total,
				inv.Fingerprint.Segments[0].Quantities["api_calls"], exp, want[inv.AccountID])
		}
		if inv.AccountID == "acct_a" {
			altered = inv.ID
		}
	}

	// Calls of the closed period that reach the log after its close (a
	// client reporting late, within ingest's lateness): acct_c's invoice
	// could not count them, and the replay must say so, not call it wrong.
	const arrivedLate = 9
	var lateMsgs []kafka.Message
	for i := 0; i < arrivedLate; i++ {
		ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_c", Environment: schemas.Live, KeyID: "key_acct_c",
			Type: "api_call", Time: prev.End.Add(-time.Duration(i+1) * time.Minute), Units: 1, Route: "/v1/items", Method: "GET", Status: 200}
		b, err := ev.Encode()
		testenv.Must(t, err, "encode")
		lateMsgs = append(lateMsgs, kafka.Message{Key: []byte("acct_c"), Value: b})
	}
	// And a retry, after the close, of a call the invoice counted: the
	// same event, no late arrival.
	lateMsgs = append(lateMsgs, kafka.Message{Key: []byte("acct_c"), Value: counted})
	lw := &kafka.Writer{Addr: kafka.TCP(cfg.Services.KafkaBrokers...), Topic: topic, Balancer: &kafka.Hash{}, RequiredAcks: kafka.RequireAll}
	testenv.Must(t, lw.WriteMessages(ctx, lateMsgs...), "produce late calls")
	testenv.Must(t, lw.Close(), "close producer")
	unique += arrivedLate // the retry adds no row
	msgs = append(msgs, lateMsgs...)
	waitLanded(t, ch, uint64(unique))

	dir := t.TempDir()
	scratch := "tollgate_replay_" + strings.TrimPrefix(testenv.Name(t), "t_")
	t.Cleanup(func() { dropClickHouseDatabase(cfg.Services, scratch, quietLog()) })
	// Small batches, so copies of an event land in different batches.
	o := replayOptions{scratch: scratch, keepScratch: true, batch: 25, reportJSON: filepath.Join(dir, "r.json"), reportCSV: filepath.Join(dir, "r.csv")}
	rep, err := runReplay(ctx, cfg, o, quietLog(), io.Discard)
	testenv.Must(t, err, "replay")
	if rep.Invoices != 3 || rep.Matching != 2 || rep.MatchingAtClose != 1 || rep.Different != 0 || rep.ArrivedAfterClose != arrivedLate {
		t.Fatalf("replay: %d invoices, %d match, %d match at close (%d arrived after), %d different: %+v",
			rep.Invoices, rep.Matching, rep.MatchingAtClose, rep.ArrivedAfterClose, rep.Different, rep.Results)
	}
	for _, r := range rep.Results {
		if r.AccountID != "acct_c" {
			if r.Result != invoicer.ResultMatch {
				t.Errorf("%s: %s, want match", r.AccountID, r.Result)
			}
			continue
		}
		if r.Result != invoicer.ResultMatchAtClose || r.ArrivedAfterClose != arrivedLate || r.ReplayEvents != r.LedgerEvents+arrivedLate ||
			r.UnbilledTotal != meteredTotal(want["acct_c"]+arrivedLate)-meteredTotal(want["acct_c"]) || r.UnbilledTotal <= 0 {
			t.Errorf("acct_c: %+v, want match_at_close with %d events arrived after, unbilled %d", r, arrivedLate,
				meteredTotal(want["acct_c"]+arrivedLate)-meteredTotal(want["acct_c"]))
		}
	}
	// Copies in different batches each land (and collapse under FINAL).
	if rep.EventsLoaded < int64(unique) || rep.Rejected != 1 || rep.RecordsRead != int64(len(msgs)) {
		t.Errorf("replay read %d records, loaded %d events, rejected %d; want %d, at least %d, 1", rep.RecordsRead, rep.EventsLoaded, rep.Rejected, len(msgs), unique)
	}
	// --since without --from audits only the invoices whose periods the
	// log it reads covers: every one before it was "different".
	since := replayOptions{since: time.Now().UTC().Add(time.Minute).Format(time.RFC3339), batch: 25,
		reportJSON: filepath.Join(dir, "s.json"), reportCSV: filepath.Join(dir, "s.csv")}
	if rep, err := runReplay(ctx, cfg, since, quietLog(), io.Discard); err != nil || rep.Invoices != 0 || rep.Different != 0 ||
		rep.From == nil || !rep.From.Equal(rep.Since.Add(5*time.Minute)) {
		t.Errorf("replay --since after every period: %d invoices audited, %d different, from %v (%v); want none, from 5 minutes after --since",
			rep.Invoices, rep.Different, rep.From, err)
	}
	var rowsLanded uint64
	testenv.Must(t, ch.Conn.QueryRow(ctx, "SELECT count() FROM "+scratch+".usage_events FINAL").Scan(&rowsLanded), "count the scratch rows")
	if rowsLanded != uint64(unique) {
		t.Errorf("scratch database holds %d events, want %d", rowsLanded, unique)
	}
	var fromJSON ReplayReport
	b, err := os.ReadFile(o.reportJSON)
	testenv.Must(t, err, "read json report")
	testenv.Must(t, json.Unmarshal(b, &fromJSON), "parse json report")
	if len(fromJSON.Results) != 3 || !fromJSON.Results[0].Match {
		t.Errorf("json report: %+v", fromJSON.Results)
	}
	f, err := os.Open(o.reportCSV)
	testenv.Must(t, err, "open csv report")
	rows, err := csv.NewReader(f).ReadAll()
	f.Close()
	testenv.Must(t, err, "parse csv report")
	if len(rows) != 4 || rows[1][11] != "match" || rows[3][11] != "match_at_close" || rows[3][13] != fmt.Sprint(arrivedLate) {
		t.Errorf("csv report: %v", rows)
	}
	if err := summarize(io.Discard, rep); err != nil {
		t.Errorf("summary of a clean replay failed: %v", err)
	}

	// Alter one raw event of acct_a in the scratch copy: it becomes test traffic.
	sc, err := openClickHouse(ctx, cfg.Services, scratch)
	testenv.Must(t, err, "open scratch")
	defer sc.Close()
	var id uuid.UUID
	testenv.Must(t, sc.QueryRow(ctx, `SELECT event_id FROM usage_events FINAL WHERE account_id = 'acct_a' AND environment = 'live'
		AND event_type = 'api_call' AND timestamp >= toDateTime(?) AND timestamp < toDateTime(?) LIMIT 1`,
		uint32(prev.Start.Unix()), uint32(prev.End.Unix())).Scan(&id), "pick an event")
	testenv.Must(t, sc.Exec(ctx, fmt.Sprintf(`INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
		event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)
		SELECT event_id, schema_version, account_id, 'test', key_id, event_type, timestamp, timestamp_us, units, kafka_partition,
		kafka_offset, ingested_at FROM usage_events WHERE event_id = toUUID('%s') AND environment = 'live'`, id)), "insert altered copy")
	testenv.Must(t, sc.Exec(ctx, fmt.Sprintf(`ALTER TABLE usage_events DELETE WHERE event_id = toUUID('%s') AND environment = 'live'`, id)), "delete original")
	testenv.Wait(t, 30*time.Second, "the delete mutation to apply", func() bool {
		var n uint64
		err := sc.QueryRow(ctx, fmt.Sprintf(`SELECT count() FROM usage_events WHERE event_id = toUUID('%s') AND environment = 'live'`, id)).Scan(&n)
		return err == nil && n == 0
	})

	// Audited again with --skip-load (without --keep-scratch): the kept
	// scratch database was there before the run, and stays.
	o.skipLoad, o.keepScratch = true, false
	rep, err = runReplay(ctx, cfg, o, quietLog(), io.Discard)
	testenv.Must(t, err, "replay after altering an event")
	if exists, err := clickHouseDatabaseExists(ctx, cfg.Services, scratch); err != nil || !exists {
		t.Errorf("the kept scratch database after a --skip-load replay: exists %v, %v; want it kept", exists, err)
	}
	// The live database is never a scratch database, loaded or not.
	for _, skip := range []bool{false, true} {
		live := replayOptions{scratch: cfg.Services.ClickHouseDatabase, skipLoad: skip}
		if _, err := runReplay(ctx, cfg, live, quietLog(), io.Discard); err == nil || !strings.Contains(err.Error(), "live database") {
			t.Errorf("replay with the live database as scratch (skip-load %v): %v, want it refused", skip, err)
		}
	}
	if exists, err := clickHouseDatabaseExists(ctx, cfg.Services, cfg.Services.ClickHouseDatabase); err != nil || !exists {
		t.Fatalf("the live database after the refused replays: exists %v, %v", exists, err)
	}
	if rep.Different != 1 || rep.Matching != 1 || rep.MatchingAtClose != 1 {
		t.Fatalf("after altering one event: %d match, %d at close, %d different, want 1, 1 and 1", rep.Matching, rep.MatchingAtClose, rep.Different)
	}
	for _, r := range rep.Results {
		if (r.Result == invoicer.ResultDifferent) != (r.InvoiceID == altered) {
			t.Errorf("invoice %s (%s): %s", r.InvoiceID, r.AccountID, r.Result)
		}
		if r.InvoiceID != altered {
			continue
		}
		// One live call became test traffic: one event and one call fewer.
		if r.ReplayEvents != r.LedgerEvents-1 || r.ReplayTotal != meteredTotal(want["acct_a"]-1) ||
			!strings.Contains(strings.Join(r.Differences, "; "), fmt.Sprintf("api_calls: ledger %d, replay %d", want["acct_a"], want["acct_a"]-1)) {
			t.Errorf("altered invoice: events %d→%d, total %d→%d, differences %v", r.LedgerEvents, r.ReplayEvents,
				r.LedgerTotal, r.ReplayTotal, r.Differences)
		}
	}
	if err := summarize(io.Discard, rep); err == nil || !strings.Contains(err.Error(), "1 of 3") {
		t.Errorf("summary of a replay with a difference: %v", err)
	}
}

// TestInvoiceCreditNoteCommandWithAKeyAppendsOnce runs `tollgate invoice
// credit-note` twice with one idempotency key, as an operator retrying after
// a timeout would: one credit note in the ledger, and the second run says
// so. The key reused for another amount is refused.
func TestInvoiceCreditNoteCommandWithAKeyAppendsOnce(t *testing.T) {
	period := invoicer.MonthPeriod(time.Now().AddDate(0, -2, 0), time.UTC)
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	billingDB(t, pg, period.Start, map[string]string{"acct_cn": "metered"})
	insertCalls(t, ch, "acct_cn", "live", period.Start.Add(time.Hour), 20)
	setWatermark(t, ch, period.End.Add(2*time.Hour))
	t.Setenv("TOLLGATE_POSTGRES_URL", pg.URL)
	t.Setenv("TOLLGATE_CLICKHOUSE_ADDR", ch.Addr)
	t.Setenv("TOLLGATE_CLICKHOUSE_DATABASE", ch.Database)
	t.Setenv("TOLLGATE_STRIPE_API_KEY", "") // the ledger only
	runTollgate(t, "invoice", "close", "--log-level", "error")
	ctx := context.Background()
	var id string
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT id FROM invoices WHERE account_id = 'acct_cn'`).Scan(&id), "the closed invoice")

	credit := []string{"invoice", "credit-note", id, "--amount", "125", "--reason", "outage", "--idempotency-key", "ticket-4711", "--log-level", "error"}
	first := runTollgate(t, credit...)
	second := runTollgate(t, credit...)
	if !strings.Contains(first, "appended to "+id) || !strings.Contains(second, "already appended") {
		t.Errorf("first run said %q, second %q; want appended, then already appended", first, second)
	}
	var n, sum int64
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT count(*), coalesce(-sum(amount_minor), 0) FROM ledger_entries
		WHERE invoice_id = $1 AND kind = 'credit_note'`, id).Scan(&n, &sum), "credit notes")
	if n != 1 || sum != 125 {
		t.Errorf("ledger holds %d credit notes for %d, want one for 125", n, sum)
	}
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"invoice", "credit-note", id, "--amount", "126", "--reason", "outage", "--idempotency-key", "ticket-4711", "--log-level", "error"})
	if err := root.ExecuteContext(ctx); err == nil || !strings.Contains(err.Error(), "idempotency key") {
		t.Errorf("the key reused for another amount: %v (%s), want it refused", err, out.String())
	}
}

// Replay takes an event as reaching the log after its invoice's close when
// its record came after the close began reading the account's usage, as
// the invoice records it. When one account at a time is read (a batch read
// failed), the first accounts are read minutes before the invoices are
// created, and an event recorded in between was on no invoice but, by the
// creation time, not late either: the invoice came out "different".
// Invoices closed before the read time was recorded keep the creation time.
func TestReplayTakesTheUsageReadTimeAsTheClose(t *testing.T) {
	read := time.Date(2026, 4, 1, 2, 0, 0, 0, time.UTC)
	march := invoicer.Period{Start: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)}
	recorded := invoicer.StoredInvoice{Invoice: invoicer.Invoice{AccountID: "acct_read", Period: march,
		Fingerprint: invoicer.Fingerprint{UsageReadAt: read}}, CreatedAt: read.Add(10 * time.Minute)}
	older := invoicer.StoredInvoice{Invoice: invoicer.Invoice{AccountID: "acct_older", Period: march}, CreatedAt: read.Add(10 * time.Minute)}
	c := newClosings([]invoicer.StoredInvoice{recorded, older})
	at := march.Start.Add(time.Hour)
	for _, tc := range []struct {
		account string
		record  time.Time
		want    bool
	}{
		{"acct_read", read.Add(-time.Second), false},
		{"acct_read", read.Add(time.Minute), true}, // before the creation, after the read
		{"acct_older", read.Add(time.Minute), false},
		{"acct_older", read.Add(11 * time.Minute), true},
		{"acct_read", time.Time{}, false}, // no record time
	} {
		if got := c.after(tc.account, at, tc.record); got != tc.want {
			t.Errorf("%s, recorded %v: after = %v, want %v", tc.account, tc.record, got, tc.want)
		}
	}
	// The read time survives the ledger's JSON document.
	b, err := json.Marshal(recorded.Invoice)
	testenv.Must(t, err, "marshal")
	var back invoicer.Invoice
	testenv.Must(t, json.Unmarshal(b, &back), "unmarshal")
	if !back.Fingerprint.UsageReadAt.Equal(read) {
		t.Errorf("usage_read_at %v after a round trip, want %v (%s)", back.Fingerprint.UsageReadAt, read, b)
	}
}
