package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/schemas"
)

// replayFixture is one account on the metered plan whose calls of the
// previous period went through a one-partition topic and ingest into the
// live database, where the invoice of that period was closed.
type replayFixture struct {
	cfg     Config
	ch      *testenv.ClickHouse
	topic   string
	prev    invoicer.Period
	invoice invoicer.Invoice
	stop    func()
}

// closedReplayFixture produces calls live calls of the previous period,
// lands them with ingest, adds phantoms rows to the live table that no
// record of the log holds, and closes the period.
func closedReplayFixture(t *testing.T, calls, phantoms int) *replayFixture {
	t.Helper()
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	testenv.CreateTopic(t, topic+".dlq", 1)
	cfg := testConfig(t, pg, ch, topic)
	now := time.Now().UTC()
	prev, _, watermark := replayTimes(now, cfg.Invoicer.Grace)
	lo := prev.Start
	if min := now.Add(-30 * 24 * time.Hour); lo.Before(min) {
		lo = min
	}
	billingDB(t, pg, prev.Start, map[string]string{"acct_r": "metered"})
	produceCalls(t, cfg, topic, "acct_r", lo, prev.End, calls)

	ing, err := NewIngestMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "start ingest")
	ictx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- ing.Run(ictx) }()
	f := &replayFixture{cfg: cfg, ch: ch, topic: topic, prev: prev}
	var once bool
	f.stop = func() {
		if !once {
			once = true
			stop()
			<-done
			_ = ing.Close()
		}
	}
	t.Cleanup(f.stop)
	waitLanded(t, ch, uint64(calls))
	if phantoms > 0 {
		insertCalls(t, ch, "acct_r", "live", lo.Add(time.Minute), phantoms)
	}
	setWatermark(t, ch, watermark)
	res := closeDue(t, cfg)
	if len(res.Closed) != 1 || res.Closed[0].Fingerprint.EventCount != int64(calls+phantoms) {
		t.Fatalf("closed %+v; want one invoice of %d events", res.Closed, calls+phantoms)
	}
	f.invoice = res.Closed[0]
	return f
}

// closeDue closes every period due, as `tollgate invoice close` does once.
func closeDue(t *testing.T, cfg Config) invoicer.CloseResult {
	t.Helper()
	ctx := context.Background()
	iv, pool, conn, err := newInvoicer(ctx, cfg, nil, quietLog())
	testenv.Must(t, err, "new invoicer")
	defer pool.Close()
	defer conn.Close()
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	return res
}

// produceCalls writes n live api_call events of account, spread over
// [lo, hi), to topic.
func produceCalls(t *testing.T, cfg Config, topic, account string, lo, hi time.Time, n int) {
	t.Helper()
	var msgs []kafka.Message
	for i := range n {
		ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: account, Environment: schemas.Live, KeyID: "key_" + account,
			Type: "api_call", Time: lo.Add(hi.Sub(lo) * time.Duration(i) / time.Duration(n+1)), Units: 1}
		b, err := ev.Encode()
		testenv.Must(t, err, "encode")
		msgs = append(msgs, kafka.Message{Key: []byte(account), Value: b})
	}
	w := &kafka.Writer{Addr: kafka.TCP(cfg.Services.KafkaBrokers...), Topic: topic, RequiredAcks: kafka.RequireAll, BatchTimeout: 10 * time.Millisecond}
	testenv.Must(t, w.WriteMessages(context.Background(), msgs...), "produce")
	testenv.Must(t, w.Close(), "close producer")
}

func waitLanded(t *testing.T, ch *testenv.ClickHouse, want uint64) {
	t.Helper()
	var landed uint64
	testenv.Wait(t, 60*time.Second, fmt.Sprintf("%d events landed", want), func() bool {
		err := ch.Conn.QueryRow(context.Background(), "SELECT count() FROM usage_events FINAL").Scan(&landed)
		return err == nil && landed == want
	})
}

func replayOpts(t *testing.T) replayOptions {
	dir := t.TempDir()
	return replayOptions{batch: 25, reportJSON: filepath.Join(dir, "r.json"), reportCSV: filepath.Join(dir, "r.csv")}
}

// TestReplayRefusesToProveWhatTheLogNoLongerHolds: retention removed the
// oldest records of the log. Replay used to read what was left and call
// the invoice different, or, once as many calls of the period had arrived
// late as were removed, prove it with calls it never billed (exit 0).
func TestReplayRefusesToProveWhatTheLogNoLongerHolds(t *testing.T) {
	ctx := context.Background()
	f := closedReplayFixture(t, 40, 0)
	testenv.DeleteRecords(t, f.topic, 0, 15)
	// As many calls of the closed period arrive late as were removed.
	produceCalls(t, f.cfg, f.topic, "acct_r", f.prev.End.Add(-time.Hour), f.prev.End, 15)
	waitLanded(t, f.ch, 55)
	f.stop()

	for _, c := range []struct {
		name string
		opts func(*replayOptions)
	}{
		{"every invoice", func(*replayOptions) {}},
		{"from the period's start", func(o *replayOptions) { o.from = f.prev.Start.Format(time.RFC3339) }},
		{"since a day before the period", func(o *replayOptions) { o.since = f.prev.Start.Add(-24 * time.Hour).Format(time.RFC3339) }},
	} {
		t.Run(c.name+" is refused", func(t *testing.T) {
			o := replayOpts(t)
			c.opts(&o)
			rep, err := runReplay(ctx, f.cfg, o, quietLog(), io.Discard)
			if err == nil || !strings.Contains(err.Error(), "no longer holds records before") || !strings.Contains(err.Error(), f.invoice.ID) {
				t.Fatalf("replay: %v (%d invoices, %d match); want it refused naming the invoice it cannot prove", err, rep.Invoices, rep.Matching)
			}
			if rep.LogStart == nil {
				t.Errorf("the report does not say where the log begins")
			}
			if exitCode(err) != 1 {
				t.Errorf("a refused replay exits with status %d, want 1", exitCode(err))
			}
		})
	}
	t.Run("from where the log can prove, the report says where it begins", func(t *testing.T) {
		o := replayOpts(t)
		o.from = time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
		rep, err := runReplay(ctx, f.cfg, o, quietLog(), io.Discard)
		testenv.Must(t, err, "replay from later")
		if rep.Invoices != 0 || rep.LogStart == nil {
			t.Fatalf("replay from later: %d invoices, log start %v; want none audited and the log's start reported", rep.Invoices, rep.LogStart)
		}
	})
}

// TestReplayDoesNotProveAnInvoiceWithEventsThatCameAfterIt: the invoice
// billed 5 calls no record of the log holds (a fault between the log and
// ClickHouse); 5 real calls of the period reached the log after the close.
// The whole log then adds up to the invoice, but the log as it stood at the
// close does not: replay used to call the invoice proved.
func TestReplayDoesNotProveAnInvoiceWithEventsThatCameAfterIt(t *testing.T) {
	ctx := context.Background()
	f := closedReplayFixture(t, 40, 5)
	produceCalls(t, f.cfg, f.topic, "acct_r", f.prev.End.Add(-time.Hour), f.prev.End, 5)
	waitLanded(t, f.ch, 50)
	f.stop()
	rep, err := runReplay(ctx, f.cfg, replayOpts(t), quietLog(), io.Discard)
	testenv.Must(t, err, "replay")
	if rep.Invoices != 1 || rep.Different != 1 {
		t.Fatalf("replay: %d invoices, %d match, %d at close, %d different: %+v; want the one invoice different",
			rep.Invoices, rep.Matching, rep.MatchingAtClose, rep.Different, rep.Results)
	}
	r := rep.Results[0]
	if r.Match || r.Result != invoicer.ResultDifferent || r.ArrivedAfterClose != 5 ||
		!strings.Contains(strings.Join(r.Differences, "; "), "only with the 5 events that reached it after the invoice was closed") {
		t.Fatalf("result %+v; want different, naming the 5 events that came after the close", r)
	}
	if err := summarize(io.Discard, rep); err == nil || exitCode(err) != ExitInvoicesDiffer {
		t.Fatalf("the summary of a replay with a different invoice: %v, exit status %d; want status %d", err, exitCode(err), ExitInvoicesDiffer)
	}
}

// TestAStringQuotedForClickHouseReadsBackAsItself: account ids are written
// into the replay's look-up of earlier copies as literals.
func TestAStringQuotedForClickHouseReadsBackAsItself(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	for _, s := range []string{"acct_1", `a'b`, `back\slash`, `\'`, "ünï", ""} {
		var got string
		testenv.Must(t, ch.Conn.QueryRow(context.Background(), "SELECT "+chString(s)).Scan(&got), "select "+chString(s))
		if got != s {
			t.Errorf("%q read back as %q", s, got)
		}
	}
}
