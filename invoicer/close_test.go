package invoicer_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	"github.com/tollgate-dev/tollgate/invoicer/stripe"
	"github.com/tollgate-dev/tollgate/invoicer/stripe/stripetest"
)

var (
	march = time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	april = time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)
)

type env struct {
	pg    *testenv.Postgres
	ch    *testenv.ClickHouse
	store *invpg.Store
	usage *invch.Usage
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{pg: testenv.NewPostgres(t), ch: testenv.NewClickHouse(t)}
	// The aggregator's DDL creates this table; the invoicer only reads it.
	testenv.Must(t, e.ch.Conn.Exec(context.Background(), `CREATE TABLE IF NOT EXISTS watermarks
		(partition Int32, watermark DateTime('UTC'), updated_at DateTime('UTC'))
		ENGINE = ReplacingMergeTree(updated_at) ORDER BY partition`), "create watermarks")
	e.store, e.usage = invpg.New(e.pg.Pool), invch.New(e.ch.Conn)
	return e
}

func (e *env) account(t *testing.T, id, tz string) {
	t.Helper()
	_, err := e.pg.Pool.Exec(context.Background(), `INSERT INTO accounts (id, name, email, timezone, created_at) VALUES ($1, $1, $1 || '@example.test', $2, $3)`,
		id, tz, march.AddDate(0, 0, -3))
	testenv.Must(t, err, "insert account")
}

func (e *env) subscribe(t *testing.T, account, plan string, from time.Time, to *time.Time) {
	t.Helper()
	_, err := e.pg.Pool.Exec(context.Background(), `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at, ends_at) VALUES ($1, $2, $3, 1, $4, $5)`,
		"sub_"+uuid.NewString(), account, plan, from, to)
	testenv.Must(t, err, "insert subscription")
}

func (e *env) watermark(t *testing.T, at time.Time) {
	t.Helper()
	b, err := e.ch.Conn.PrepareBatch(context.Background(), "INSERT INTO watermarks (partition, watermark, updated_at)")
	testenv.Must(t, err, "prepare watermark")
	for p := int32(0); p < 2; p++ {
		testenv.Must(t, b.Append(p, at, time.Now().UTC()), "append watermark")
	}
	testenv.Must(t, b.Send(), "write watermark")
}

type ev struct {
	account, env, typ string
	at                time.Time
	n                 int
	dup               bool // insert every event twice, as a redelivery would
}

func (e *env) events(t *testing.T, evs ...ev) {
	t.Helper()
	b, err := e.ch.Conn.PrepareBatch(context.Background(), `INSERT INTO usage_events (event_id, schema_version, account_id,
		environment, key_id, event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)`)
	testenv.Must(t, err, "prepare insert")
	for _, x := range evs {
		for i := 0; i < x.n; i++ {
			id := uuid.New()
			at := x.at.Add(time.Duration(i) * time.Millisecond)
			copies := 1
			if x.dup {
				copies = 2
			}
			for c := 0; c < copies; c++ {
				testenv.Must(t, b.Append(id, uint8(1), x.account, x.env, "key_1", x.typ, at.Truncate(time.Second),
					uint64(at.UnixMicro()), int64(1), int32(0), int64(i), time.Now().UTC()), "append event")
			}
		}
	}
	testenv.Must(t, b.Send(), "insert events")
}

// starter adds an account in UTC on the starter plan since February, with
// calls live calls early in March.
func (e *env) starter(t *testing.T, account string, calls int) {
	t.Helper()
	e.account(t, account, "UTC")
	e.subscribe(t, account, "starter", march.AddDate(0, -1, 0), nil)
	if calls > 0 {
		e.events(t, ev{account: account, env: "live", typ: "api_call", at: march.Add(time.Hour), n: calls})
	}
}

// marchInvoice closes March for a new account on the starter plan and
// returns its invoice's id.
func (e *env) marchInvoice(t *testing.T, account string) string {
	t.Helper()
	e.starter(t, account, 0)
	e.watermark(t, april.Add(2*time.Hour))
	res, err := e.aprilInvoicer(t, e.usage, nil).CloseDue(context.Background())
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 {
		t.Fatalf("closed %d invoices, want 1", len(res.Closed))
	}
	return res.Closed[0].ID
}

// aprilInvoicer is an invoicer as it runs on 4 April: a grace of an hour,
// looking back one month, with the watermark wm and Stripe st (nil: none).
func (e *env) aprilInvoicer(t *testing.T, wm invoicer.Watermark, st invoicer.Stripe) *invoicer.Invoicer {
	t.Helper()
	iv, err := invoicer.New(e.store, e.usage, wm, st,
		invoicer.Options{Grace: time.Hour, Lookback: 1, Now: func() time.Time { return april.AddDate(0, 0, 3) }}, quiet())
	testenv.Must(t, err, "new invoicer")
	return iv
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestCloseInvoicesEveryAccountOnceFromLiveUsage(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.account(t, "acct_free", "UTC")
	e.account(t, "acct_starter", "UTC")
	e.account(t, "acct_tokyo", "Asia/Tokyo")
	e.account(t, "acct_change", "UTC")
	e.subscribe(t, "acct_starter", "starter", march.AddDate(0, -1, 0), nil)
	e.subscribe(t, "acct_tokyo", "growth", march.AddDate(0, -1, 0), nil)
	change := march.AddDate(0, 0, 10) // 11 March 00:00 UTC
	e.subscribe(t, "acct_change", "starter", march.AddDate(0, -1, 0), &change)
	e.subscribe(t, "acct_change", "growth", change, nil)

	tokyo, _ := time.LoadLocation("Asia/Tokyo")
	e.events(t,
		ev{account: "acct_free", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 700},
		ev{account: "acct_free", env: "test", typ: "api_call", at: march.Add(time.Hour), n: 300},                    // test mode: never billed
		ev{account: "acct_starter", env: "live", typ: "api_call", at: march.Add(2 * time.Hour), n: 1500, dup: true}, // redelivered
		ev{account: "acct_starter", env: "live", typ: "custom.report", at: march.Add(2 * time.Hour), n: 5},          // not the meter's type
		ev{account: "acct_starter", env: "live", typ: "api_call", at: april.Add(time.Hour), n: 50},                  // next period
		// Tokyo's March begins at 15:00 UTC on 28 February.
		ev{account: "acct_tokyo", env: "live", typ: "api_call", at: time.Date(2026, 3, 1, 0, 0, 0, 0, tokyo).Add(-time.Second), n: 1},
		ev{account: "acct_tokyo", env: "live", typ: "api_call", at: time.Date(2026, 3, 1, 0, 0, 0, 0, tokyo), n: 40},
		ev{account: "acct_change", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 200},
		ev{account: "acct_change", env: "live", typ: "api_call", at: change.Add(time.Hour), n: 300},
	)

	fake := stripetest.New()
	defer fake.Close()
	sc := stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL})
	iv, err := invoicer.New(e.store, e.usage, e.usage, sc, invoicer.Options{Grace: time.Hour, Lookback: 2,
		Now: func() time.Time { return april.AddDate(0, 0, 3) }}, quiet())
	testenv.Must(t, err, "new invoicer")

	t.Run("no watermark closes nothing", func(t *testing.T) {
		res, err := iv.CloseDue(ctx)
		if err == nil || len(res.Closed) != 0 {
			t.Fatalf("got %d invoices, err %v", len(res.Closed), err)
		}
	})
	// April 00:30 UTC is past Tokyo's March (it ended at 15:00 UTC on 31
	// March) and every February, but inside the grace of UTC March.
	e.watermark(t, april.Add(30*time.Minute))
	first, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(first.Closed) != 5 {
		t.Fatalf("first close: %d invoices, want 5 (4 Februaries and Tokyo's March)", len(first.Closed))
	}
	for _, inv := range first.Closed {
		if inv.Period.Start.Equal(march) {
			t.Fatalf("%s: UTC March closed inside its grace", inv.AccountID)
		}
	}
	e.watermark(t, april.Add(2*time.Hour))
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 3 {
		t.Fatalf("second close: %d invoices, want UTC March of 3 accounts", len(res.Closed))
	}
	res.Closed = append(res.Closed, first.Closed...)
	want := map[string]struct {
		total  int64
		events int64
		lines  int
	}{
		"acct_free":    {0, 700, 1},
		"acct_starter": {2900, 1505, 2}, // 1,500 calls within the 100,000 included
		"acct_tokyo":   {9900, 40, 2},
		// starter 10/31 of 2900 = 935.48 → 935, growth 21/31 of 9900 = 6706.45 → 6706
		"acct_change": {935 + 6706, 500, 4},
	}
	for _, inv := range res.Closed {
		if !inv.Period.Start.Equal(march) && inv.AccountID != "acct_tokyo" {
			continue
		}
		if inv.AccountID == "acct_tokyo" && inv.Period.Start.Month() != time.February {
			continue // Tokyo's March starts on 28 Feb UTC
		}
		w := want[inv.AccountID]
		if inv.Total != w.total || inv.Fingerprint.EventCount != w.events || len(inv.Lines) != w.lines {
			t.Errorf("%s %s: total %d events %d lines %d, want %+v", inv.AccountID, inv.Period.Start, inv.Total,
				inv.Fingerprint.EventCount, len(inv.Lines), w)
		}
	}

	t.Run("closing again adds nothing", func(t *testing.T) {
		res, err := iv.CloseDue(ctx)
		testenv.Must(t, err, "close again")
		if len(res.Closed) != 0 {
			t.Fatalf("second close made %d invoices", len(res.Closed))
		}
		var n int
		testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE kind IN ('invoice.draft','invoice.finalized')`).Scan(&n), "count")
		if n != 16 {
			t.Fatalf("ledger has %d draft/finalized entries, want 16", n)
		}
	})
	t.Run("the ledger refuses edits", func(t *testing.T) {
		_, err := e.pg.Pool.Exec(ctx, `UPDATE ledger_entries SET amount_minor = 0`)
		if err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Fatalf("update: %v", err)
		}
		_, err = e.pg.Pool.Exec(ctx, `DELETE FROM invoices`)
		if err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Fatalf("delete: %v", err)
		}
	})
	t.Run("stripe gets each positive invoice once with its lines", func(t *testing.T) {
		testenv.Must(t, iv.SyncStripe(ctx), "sync")
		testenv.Must(t, iv.SyncStripe(ctx), "sync again")
		invs := fake.Invoices()
		// Every period of the three paying accounts; free owes nothing.
		if len(invs) != 6 {
			t.Fatalf("stripe invoices: got %d, want 6", len(invs))
		}
		if fake.Customers() != 3 {
			t.Errorf("stripe customers: got %d, want 3", fake.Customers())
		}
		for _, si := range invs {
			stored, err := e.store.Invoice(ctx, si.Metadata["tollgate_invoice_id"])
			testenv.Must(t, err, "load invoice")
			if si.Status != "open" || si.AmountDue != stored.Total {
				t.Errorf("%s: stripe %s %d, ledger %d", stored.ID, si.Status, si.AmountDue, stored.Total)
			}
			if stored.Status != invoicer.StatusSynced || stored.HostedURL == "" {
				t.Errorf("%s: status %s hosted %q", stored.ID, stored.Status, stored.HostedURL)
			}
			// The customer reads the period's first and last day in the
			// account's zone: Tokyo's March began at 15:00 UTC on 28
			// February, and a month ends before the 1st of the next.
			a, err := e.store.Account(ctx, stored.AccountID)
			testenv.Must(t, err, "load account")
			loc, _ := time.LoadLocation(a.Timezone)
			first := stored.Period.Start.In(loc)
			want := fmt.Sprintf("Usage %s – %s", first.Format("2006-01-02"), first.AddDate(0, 1, -1).Format("2006-01-02"))
			if stored.AccountID == "acct_tokyo" && first.Month() == time.March && want != "Usage 2026-03-01 – 2026-03-31" {
				t.Fatalf("the test's own expectation is off: %q", want)
			}
			if si.Description != want {
				t.Errorf("%s (%s): stripe description %q, want %q", stored.ID, a.Timezone, si.Description, want)
			}
			for _, it := range si.Items {
				if strings.Contains(it.Description, "units") && !strings.HasSuffix(it.Description, want[len("Usage "):]) {
					t.Errorf("%s: item %q does not end with the period's days", stored.ID, it.Description)
				}
			}
		}
	})
	t.Run("a webhook is recorded once", func(t *testing.T) {
		invs, err := e.store.AccountInvoices(ctx, "acct_starter")
		testenv.Must(t, err, "list")
		evt := invoicer.WebhookEvent{ID: "evt_1", Type: "invoice.paid", InvoiceID: invs[0].ID, ObjectID: invs[0].StripeInvoiceID, Amount: invs[0].Total, Payload: []byte(`{}`)}
		fresh, err := e.store.RecordWebhook(ctx, evt)
		testenv.Must(t, err, "record")
		again, err := e.store.RecordWebhook(ctx, evt)
		testenv.Must(t, err, "record again")
		if !fresh || again {
			t.Fatalf("fresh %v again %v", fresh, again)
		}
		got, err := e.store.Invoice(ctx, invs[0].ID)
		testenv.Must(t, err, "load")
		if got.Status != invoicer.StatusPaid {
			t.Errorf("status after invoice.paid: %s", got.Status)
		}
	})
	t.Run("a credit note corrects without editing", func(t *testing.T) {
		invs, _ := e.store.AccountInvoices(ctx, "acct_change")
		testenv.Must(t, credit(ctx, e.store, invs[0].ID, 100, "goodwill"), "credit note")
		var sum int64
		testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT sum(amount_minor) FROM ledger_entries WHERE invoice_id = $1 AND kind IN ('invoice.finalized', 'credit_note')`, invs[0].ID).Scan(&sum), "sum")
		if sum != invs[0].Total-100 {
			t.Errorf("balance: got %d, want %d", sum, invs[0].Total-100)
		}
	})
	t.Run("credit notes never add up to more than the invoice", func(t *testing.T) {
		invs, _ := e.store.AccountInvoices(ctx, "acct_change")
		inv := invs[0] // 100 credited above
		left := inv.Total - 100
		if left <= 1 {
			t.Fatalf("invoice total %d too small for the test", inv.Total)
		}
		err := credit(ctx, e.store, inv.ID, left+1, "too much")
		if !errors.Is(err, invoicer.ErrConflict) {
			t.Fatalf("crediting %d of %d left: %v, want a conflict", left+1, left, err)
		}
		// One waiting on another's lock reads what the other committed.
		// The other (a transaction here) locks the invoice and credits 1;
		// the waiting one asks for all that was left before.
		tx, err := e.pg.Pool.Begin(ctx)
		testenv.Must(t, err, "begin")
		_, err = tx.Exec(ctx, `SELECT 1 FROM invoices WHERE id = $1 FOR UPDATE`, inv.ID)
		testenv.Must(t, err, "lock the invoice")
		_, err = tx.Exec(ctx, `INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
			SELECT account_id, 'credit_note', id, -1, currency, '{"reason": "held"}' FROM invoices WHERE id = $1`, inv.ID)
		testenv.Must(t, err, "credit 1 under the lock")
		waited := make(chan error, 1)
		go func() { waited <- credit(ctx, e.store, inv.ID, left, "all that was left") }()
		testenv.Wait(t, 10*time.Second, "the second credit note to wait for the lock", func() bool {
			var n int
			err := e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
				AND wait_event_type = 'Lock'`).Scan(&n)
			return err == nil && n > 0
		})
		testenv.Must(t, tx.Commit(ctx), "commit the first credit note")
		if err := <-waited; !errors.Is(err, invoicer.ErrConflict) {
			t.Fatalf("a credit note for %d after another took 1 of it meanwhile: %v, want a conflict", left, err)
		}
		left--

		// Eight at once, each for all that is left: exactly one passes.
		const racers = 8
		errs := make(chan error, racers)
		start := make(chan struct{})
		for range racers {
			go func() { <-start; errs <- credit(ctx, e.store, inv.ID, left, "all of it") }()
		}
		close(start)
		passed := 0
		for range racers {
			if err := <-errs; err == nil {
				passed++
			} else if !errors.Is(err, invoicer.ErrConflict) {
				t.Errorf("a refused credit note: %v, want a conflict", err)
			}
		}
		if passed != 1 {
			t.Fatalf("%d of %d credit notes for all that is left passed, want 1", passed, racers)
		}
		var sum int64
		testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT sum(amount_minor) FROM ledger_entries WHERE invoice_id = $1 AND kind IN ('invoice.finalized', 'credit_note')`, inv.ID).Scan(&sum), "sum")
		if sum != 0 {
			t.Errorf("balance after crediting everything: %d, want 0", sum)
		}
		if err := credit(ctx, e.store, "inv_missing", 1, "none"); !errors.Is(err, invoicer.ErrNotFound) {
			t.Errorf("credit note on a missing invoice: %v, want not found", err)
		}
	})
	t.Run("credit notes reach stripe once", func(t *testing.T) {
		// acct_change's first invoice is open in Stripe and now wholly
		// credited (three credit notes above); acct_starter's first is paid
		// there, and its credit goes to the customer's balance.
		starter, _ := e.store.AccountInvoices(ctx, "acct_starter")
		paid := starter[0]
		fake.Pay(paid.StripeInvoiceID)
		testenv.Must(t, credit(ctx, e.store, paid.ID, 250, "outage credit"), "credit a paid invoice")
		testenv.Must(t, iv.SyncStripe(ctx), "sync")
		testenv.Must(t, iv.SyncStripe(ctx), "sync again")
		change, _ := e.store.AccountInvoices(ctx, "acct_change")
		open := change[0]
		byInvoice := map[string][]stripetest.CreditNote{}
		for _, cn := range fake.CreditNotes() {
			byInvoice[cn.Metadata["tollgate_invoice_id"]] = append(byInvoice[cn.Metadata["tollgate_invoice_id"]], cn)
		}
		if got := byInvoice[open.ID]; len(got) != 3 || got[0].Amount != 100 || got[1].Amount != 1 || got[2].Amount != open.Total-101 ||
			got[0].Type != "pre_payment" || got[0].Memo != "goodwill" || got[0].Invoice != open.StripeInvoiceID {
			t.Errorf("credit notes of the open invoice: %+v, want 100, 1 and %d before payment", got, open.Total-101)
		}
		if got := byInvoice[paid.ID]; len(got) != 1 || got[0].Amount != 250 || got[0].Type != "post_payment" || got[0].CreditAmount != 250 {
			t.Errorf("credit notes of the paid invoice: %+v, want 250 to the customer's balance", got)
		}
		if n := len(fake.CreditNotes()); n != 4 {
			t.Errorf("stripe holds %d credit notes, want 4", n)
		}
		for _, si := range fake.Invoices() {
			if si.ID == open.StripeInvoiceID && si.AmountDue != 0 {
				t.Errorf("wholly credited invoice: %d due in stripe, want 0", si.AmountDue)
			}
		}
	})
}

// credit appends a credit note without an idempotency key.
func credit(ctx context.Context, s invoicer.Store, invoiceID string, amount int64, reason string) error {
	_, err := s.AppendCreditNote(ctx, invoiceID, amount, reason, "")
	return err
}

// A credit note given an idempotency key is appended once however often it
// is asked for, at once or later; the key names that credit note alone.
func TestCreditNoteIdempotencyKey(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, a := range []string{"acct_cn_a", "acct_cn_b", "acct_cn_c"} {
		e.starter(t, a, 10)
	}
	e.watermark(t, april.Add(2*time.Hour))
	iv := e.aprilInvoicer(t, e.usage, nil)
	_, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	first := func(acct string) invoicer.StoredInvoice {
		invs, err := e.store.AccountInvoices(ctx, acct)
		testenv.Must(t, err, "invoices")
		if len(invs) != 1 || invs[0].Total < 100 {
			t.Fatalf("%s's invoices: %+v, want one of at least 100", acct, invs)
		}
		return invs[0]
	}
	a, b, c := first("acct_cn_a"), first("acct_cn_b"), first("acct_cn_c")
	notes := func(key string) (n int, sum int64) {
		testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*), coalesce(-sum(amount_minor), 0) FROM ledger_entries
			WHERE kind = 'credit_note' AND payload ->> 'idempotency_key' = $1`, key).Scan(&n, &sum), "count credit notes")
		return n, sum
	}

	made, err := e.store.AppendCreditNote(ctx, a.ID, 40, "outage", "cn-1")
	testenv.Must(t, err, "first credit note")
	again, err := e.store.AppendCreditNote(ctx, a.ID, 40, "outage", "cn-1")
	testenv.Must(t, err, "the same again")
	if made.Replayed || !again.Replayed || again.ID != made.ID {
		t.Errorf("first %+v, again %+v: want the first made and the second replaying it", made, again)
	}
	if n, sum := notes("cn-1"); n != 1 || sum != 40 {
		t.Errorf("cn-1: %d credit notes for %d, want one for 40", n, sum)
	}
	for _, c := range []struct {
		inv    string
		amount int64
		reason string
	}{{a.ID, 41, "outage"}, {a.ID, 40, "another reason"}, {b.ID, 40, "outage"}} {
		if _, err := e.store.AppendCreditNote(ctx, c.inv, c.amount, c.reason, "cn-1"); !errors.Is(err, invoicer.ErrConflict) {
			t.Errorf("key cn-1 reused for %d on %s (%q): %v, want a conflict", c.amount, c.inv, c.reason, err)
		}
	}

	// A retry of the credit note that took the rest of the invoice is
	// answered with it, not refused by the cap.
	rest := a.Total - 40
	_, err = e.store.AppendCreditNote(ctx, a.ID, rest, "the rest", "cn-2")
	testenv.Must(t, err, "credit the rest")
	if r, err := e.store.AppendCreditNote(ctx, a.ID, rest, "the rest", "cn-2"); err != nil || !r.Replayed {
		t.Errorf("retrying the credit note that took the rest: %+v, %v; want it replayed", r, err)
	}
	if _, err := e.store.AppendCreditNote(ctx, a.ID, 1, "more", "cn-3"); !errors.Is(err, invoicer.ErrConflict) {
		t.Errorf("a new credit note on a wholly credited invoice: %v, want a conflict", err)
	}

	// Racers with one key, on one invoice and on two (each with room for
	// it): exactly one credit note; the racers for its invoice get it,
	// the others a conflict.
	for _, two := range []bool{false, true} {
		key := fmt.Sprintf("cn-race-%v", two)
		const racers = 8
		type outcome struct {
			inv string
			r   invoicer.CreditNoteResult
			err error
		}
		out := make(chan outcome, racers)
		start := make(chan struct{})
		for i := range racers {
			inv := b.ID
			if two && i%2 == 1 {
				inv = c.ID
			}
			go func() {
				<-start
				r, err := e.store.AppendCreditNote(ctx, inv, 5, "race", key)
				out <- outcome{inv, r, err}
			}()
		}
		close(start)
		var got []outcome
		for range racers {
			got = append(got, <-out)
		}
		var owner string
		testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT invoice_id FROM ledger_entries
			WHERE kind = 'credit_note' AND payload ->> 'idempotency_key' = $1`, key).Scan(&owner), "the raced credit note")
		made, ids := 0, map[int64]bool{}
		for _, o := range got {
			switch {
			case o.inv == owner && o.err == nil:
				ids[o.r.ID] = true
				if !o.r.Replayed {
					made++
				}
			case o.inv != owner && errors.Is(o.err, invoicer.ErrConflict):
			default:
				t.Errorf("%s: racer on %s (the credit note is on %s): %+v, %v", key, o.inv, owner, o.r, o.err)
			}
		}
		if n, sum := notes(key); made != 1 || len(ids) != 1 || n != 1 || sum != 5 {
			t.Errorf("%s: %d made, ids %v, ledger %d credit notes for %d; want one of 5", key, made, ids, n, sum)
		}
	}

	for _, key := range []string{"has space", "tab\tkey", "é", strings.Repeat("k", invoicer.MaxIdempotencyKey+1)} {
		if _, err := e.store.AppendCreditNote(ctx, b.ID, 1, "bad key", key); !errors.Is(err, invoicer.ErrInvalid) {
			t.Errorf("key %q: %v, want invalid", key, err)
		}
	}
	if _, err := e.store.AppendCreditNote(ctx, b.ID, 1, "long key", strings.Repeat("k", invoicer.MaxIdempotencyKey)); err != nil {
		t.Errorf("a key of %d characters: %v", invoicer.MaxIdempotencyKey, err)
	}
}

// A close that stopped between saving its drafts and finalizing them left
// drafts whose periods count as invoiced; the next close finalizes them.
func TestCloseFinalizesTheDraftsAnEarlierCloseLeft(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_draft", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	iv := e.aprilInvoicer(t, e.usage, stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL}))
	accts, err := e.store.Accounts(ctx)
	testenv.Must(t, err, "accounts")
	invs, err := iv.ComputePeriod(ctx, e.usage, invoicer.MonthPeriod(march, time.UTC), accts, april.Add(2*time.Hour))
	testenv.Must(t, err, "compute")
	testenv.Must(t, e.store.SaveDrafts(ctx, invs), "save drafts") // and the process dies here
	if _, err := iv.CloseDue(ctx); err != nil {
		t.Fatal(err)
	}
	for _, inv := range invs {
		got, err := e.store.Invoice(ctx, inv.ID)
		testenv.Must(t, err, "read invoice")
		if got.Status != invoicer.StatusFinalized {
			t.Errorf("invoice %s is %s after the next close, want finalized", inv.ID, got.Status)
		}
	}
}

// An account whose invoice cannot be computed (its plan does not load) is
// reported and left for the next run; the other accounts are invoiced.
func TestOneAccountThatCannotBeInvoicedDoesNotHoldBackTheOthers(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.account(t, "acct_good", "UTC")
	e.account(t, "acct_bad", "UTC")
	e.subscribe(t, "acct_good", "starter", march.AddDate(0, -1, 0), nil)
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('broken', 1, 'Broken', 'usd', '{"prices": 7}')`)
	testenv.Must(t, err, "insert a plan that does not load")
	e.subscribe(t, "acct_bad", "broken", march.AddDate(0, -1, 0), nil)
	e.events(t, ev{account: "acct_good", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 10},
		ev{account: "acct_bad", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 10})
	e.watermark(t, april.Add(2*time.Hour))
	var logged bytes.Buffer
	iv, err := invoicer.New(e.store, e.usage, e.usage, nil, invoicer.Options{Grace: time.Hour, Lookback: 1,
		Now: func() time.Time { return april.AddDate(0, 0, 3) }}, slog.New(slog.NewTextHandler(&logged, nil)))
	testenv.Must(t, err, "new invoicer")
	t0 := time.Now()
	res, err := iv.CloseDue(ctx)
	t1 := time.Now()
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 || res.Closed[0].AccountID != "acct_good" {
		t.Fatalf("closed %+v, want acct_good's March alone", res.Closed)
	}
	// The invoice records when its usage was read, for replay.
	stored, err := e.store.Invoice(ctx, res.Closed[0].ID)
	testenv.Must(t, err, "stored invoice")
	if read := stored.Fingerprint.UsageReadAt; read.Before(t0.Add(-time.Second)) || read.After(t1) {
		t.Errorf("usage_read_at %v, want within the close (%v to %v)", read, t0, t1)
	}
	if got := res.Failed[march]; len(got) != 1 || got[0] != "acct_bad" {
		t.Fatalf("failed %v, want acct_bad for March", res.Failed)
	}
	// The log says until when the period is retried: with one month of
	// lookback, March is not considered from May on.
	if !strings.Contains(logged.String(), "account=acct_bad") || !strings.Contains(logged.String(), "retried_until=2026-05-01T00:00:00Z") {
		t.Errorf("log %q; want acct_bad's failure with retried_until=2026-05-01T00:00:00Z", logged.String())
	}
}

// An account whose time zone changes after an invoice is billed from where
// that invoice ended: no month is billed twice under the two zones, no
// hour is left out, and every event is on exactly one invoice.
func TestAZoneChangeBillsEveryEventOnce(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_moved", 0)
	may := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	e.events(t,
		ev{account: "acct_moved", env: "live", typ: "api_call", at: march.Add(10 * 24 * time.Hour), n: 100},
		ev{account: "acct_moved", env: "live", typ: "api_call", at: april.Add(-4 * time.Hour), n: 7},      // UTC March, Tokyo April
		ev{account: "acct_moved", env: "live", typ: "api_call", at: april.Add(9 * 24 * time.Hour), n: 20}, // April either way
		ev{account: "acct_moved", env: "live", typ: "api_call", at: may.Add(-8 * time.Hour), n: 3},        // UTC April, Tokyo May
	)
	closeAt := func(now time.Time) []invoicer.Invoice {
		t.Helper()
		e.watermark(t, now.AddDate(0, 0, -2))
		iv, err := invoicer.New(e.store, e.usage, e.usage, nil,
			invoicer.Options{Grace: time.Hour, Lookback: 2, Now: func() time.Time { return now }}, quiet())
		testenv.Must(t, err, "new invoicer")
		res, err := iv.CloseDue(ctx)
		testenv.Must(t, err, "close")
		return res.Closed
	}
	span := func(inv invoicer.Invoice) string {
		return inv.Period.Start.UTC().Format(time.RFC3339) + "/" + inv.Period.End.UTC().Format(time.RFC3339)
	}

	// The account dates from late February: February (no usage) and March.
	first := closeAt(april.AddDate(0, 0, 3))
	if len(first) != 2 || span(first[1]) != "2026-03-01T00:00:00Z/2026-04-01T00:00:00Z" || first[1].Fingerprint.EventCount != 107 {
		t.Fatalf("first close: %d invoices, want UTC February and March, March with 107 events", len(first))
	}
	_, err := e.pg.Pool.Exec(ctx, `UPDATE accounts SET timezone = 'Asia/Tokyo' WHERE id = 'acct_moved'`)
	testenv.Must(t, err, "change the account's zone")

	// Tokyo's April runs from 15:00 UTC on 31 March; the part of it UTC
	// March's invoice covered is not billed again, nor is Tokyo's March.
	second := closeAt(may.AddDate(0, 0, 3))
	if len(second) != 1 || span(second[0]) != "2026-04-01T00:00:00Z/2026-04-30T15:00:00Z" || second[0].Fingerprint.EventCount != 20 {
		for _, inv := range second {
			t.Errorf("second close: %s with %d events", span(inv), inv.Fingerprint.EventCount)
		}
		t.Fatalf("second close: %d invoices, want one from 1 April 00:00 UTC to Tokyo's May with 20 events", len(second))
	}
	third := closeAt(may.AddDate(0, 1, 3))
	if len(third) != 1 || span(third[0]) != "2026-04-30T15:00:00Z/2026-05-31T15:00:00Z" || third[0].Fingerprint.EventCount != 3 {
		t.Fatalf("third close: %d invoices, want Tokyo's May with 3 events", len(third))
	}
	stored, err := e.store.AccountInvoices(ctx, "acct_moved")
	testenv.Must(t, err, "list invoices")
	var events int64
	for _, inv := range stored {
		events += inv.Fingerprint.EventCount
	}
	if len(stored) != 4 || events != 130 {
		t.Errorf("ledger: %d invoices with %d events in all, want 4 with all 130", len(stored), events)
	}
}

// An edge's spool hold keeps the periods it reaches into open: events an
// edge spooled while Kafka was unreachable land after the usage watermark
// has passed the period, and would otherwise miss its invoice. The period
// closes once the hold is released and the watermark has passed the
// release, with the spooled events on the invoice; the hold is retired.
func TestSpoolHoldKeepsThePeriodOpenUntilItsEventsLand(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_held", 10)
	e.watermark(t, april.Add(2*time.Hour))
	since := april.Add(-30 * time.Minute) // the first event spooled, in March
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO edge_spool_holds (instance, since) VALUES ('edge-a:/spool', $1)`, since)
	testenv.Must(t, err, "hold")
	iv := e.aprilInvoicer(t, invoicer.HeldWatermark{Usage: e.usage, Holds: e.store, Log: quiet()}, nil)
	closeDue := func(step string) invoicer.CloseResult {
		t.Helper()
		res, err := iv.CloseDue(ctx)
		testenv.Must(t, err, step)
		return res
	}

	if res := closeDue("close while the spool holds events"); len(res.Closed) != 0 || !res.Watermark.Equal(since) {
		t.Fatalf("while held: closed %d invoices, watermark %s; want none closed, the watermark held at %s", len(res.Closed), res.Watermark, since)
	}
	// The spool drains: its five events reach Kafka after the watermark
	// and land; the edge marks the hold released when Kafka took them.
	released := april.Add(3 * time.Hour)
	e.events(t, ev{account: "acct_held", env: "live", typ: "api_call", at: since, n: 5})
	_, err = e.pg.Pool.Exec(ctx, `UPDATE edge_spool_holds SET released_at = $1`, released)
	testenv.Must(t, err, "release")
	if res := closeDue("close before the watermark passes the release"); len(res.Closed) != 0 {
		t.Fatalf("released, watermark before the release: closed %d invoices, want none", len(res.Closed))
	}
	time.Sleep(1100 * time.Millisecond) // a newer updated_at for the watermark rows
	e.watermark(t, released.Add(time.Minute))
	res := closeDue("close after the watermark passed the release")
	if len(res.Closed) != 1 || res.Closed[0].Fingerprint.EventCount != 15 {
		t.Fatalf("after the release: closed %+v, want March's invoice with all 15 events", res.Closed)
	}
	var holds int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM edge_spool_holds`).Scan(&holds), "count holds")
	if holds != 0 {
		t.Errorf("%d holds left after the watermark passed the release, want the hold retired", holds)
	}

	// A hold that starts after a period ends does not hold that period,
	// and one the edge took up again is not retired.
	_, err = e.pg.Pool.Exec(ctx, `INSERT INTO edge_spool_holds (instance, since) VALUES ('edge-b:/spool', $1)`, released)
	testenv.Must(t, err, "a later hold")
	wm, err := (invoicer.HeldWatermark{Usage: e.usage, Holds: e.store, Log: quiet()}).Watermark(ctx)
	testenv.Must(t, err, "held watermark")
	if !wm.Equal(released) {
		t.Errorf("watermark with a hold since %s: %s, want the hold's since", released, wm)
	}
}

// A plan that prices a meter the configuration does not define is not
// billed as if nothing had been used: the account's invoice fails with the
// reason and is tried again on the next run.
func TestAPlanPricingAnUnconfiguredMeterIsNotBilledAtZero(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('typo', 1, 'Typo', 'usd',
		'{"prices": [{"key": "calls", "model": "per_unit", "meter": "api_call", "unit_amount": "100"}]}')`)
	testenv.Must(t, err, "insert plan")
	e.account(t, "acct_typo", "UTC")
	e.subscribe(t, "acct_typo", "typo", march.AddDate(0, -1, 0), nil)
	e.events(t, ev{account: "acct_typo", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 50})
	e.watermark(t, april.Add(2*time.Hour))
	iv := e.aprilInvoicer(t, e.usage, nil)
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 0 || len(res.Failed[march]) != 1 || res.Failed[march][0] != "acct_typo" {
		t.Fatalf("closed %+v, failed %v; want no invoice and acct_typo failed for March", res.Closed, res.Failed)
	}
}

// Stripe does not deliver webhooks in order, and a sync resumed after a
// crash may record an invoice as sent after Stripe reported it paid: the
// status is the furthest along, and paid stays paid.
func TestInvoiceStatusNeverGoesBack(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.marchInvoice(t, "acct_order")
	// The sync records its Stripe invoice before it finalizes it, so
	// before any payment event of it can come.
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "invoice", "in_x", nil), "the sync's invoice step")
	status := func() invoicer.Status {
		got, err := e.store.Invoice(ctx, id)
		testenv.Must(t, err, "load invoice")
		return got.Status
	}
	webhook := func(evID, typ string) {
		_, err := e.store.RecordWebhook(ctx, invoicer.WebhookEvent{ID: evID, Type: typ, InvoiceID: id, ObjectID: "in_x", Payload: []byte(`{}`)})
		testenv.Must(t, err, "record "+typ)
	}
	webhook("evt_1", "invoice.payment_failed")
	if s := status(); s != invoicer.StatusPaymentFailed {
		t.Fatalf("after payment_failed: %s", s)
	}
	webhook("evt_2", "invoice.paid")
	testenv.Must(t, e.store.MarkSynced(ctx, id, "in_x", "https://pay.example/x"), "mark synced after paid")
	if s := status(); s != invoicer.StatusPaid {
		t.Errorf("paid, then the sync recorded as done: %s, want paid", s)
	}
	webhook("evt_3", "invoice.payment_failed") // an older attempt's event, retried late
	if s := status(); s != invoicer.StatusPaid {
		t.Errorf("paid, then a late payment_failed: %s, want paid", s)
	}
	webhook("evt_4", "invoice.voided") // Stripe voids no paid invoice: a stray or replayed event
	if s := status(); s != invoicer.StatusPaid {
		t.Errorf("paid, then voided: %s, want paid (the first final status stands)", s)
	}
}

// A webhook about a Stripe invoice that is not the one the sync made for a
// ledger invoice (a copy carrying the same metadata) leaves that invoice's
// status alone.
func TestWebhooksOfAnotherStripeInvoiceLeaveTheStatus(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.marchInvoice(t, "acct_stray")
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "invoice", "in_ours", nil), "the sync's invoice step")
	for _, w := range []struct{ ev, typ, object string }{{"evt_a", "invoice.voided", "in_copy"}, {"evt_b", "invoice.paid", "in_ours"}} {
		_, err := e.store.RecordWebhook(ctx, invoicer.WebhookEvent{ID: w.ev, Type: w.typ, InvoiceID: id, ObjectID: w.object, Payload: []byte(`{}`)})
		testenv.Must(t, err, "record "+w.typ)
	}
	got, err := e.store.Invoice(ctx, id)
	testenv.Must(t, err, "load invoice")
	if got.Status != invoicer.StatusPaid {
		t.Errorf("a copy voided, ours paid: %s, want paid", got.Status)
	}
	var stray int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE invoice_id = $1 AND kind = 'stripe.invoice.voided'`, id).Scan(&stray), "count")
	if stray != 0 {
		t.Errorf("the copy's voided event made %d ledger entries, want none", stray)
	}
}

// Two closes of one period (a cron close beside the running invoicer) may
// compute the same invoice differently (a plan changed between their
// reads): the one stored first keeps its lines, and the other's extra lines
// never join it.
func TestASecondComputationOfAnInvoiceAddsNoLines(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_twice", 10)
	iv, err := invoicer.New(e.store, e.usage, e.usage, nil, invoicer.Options{Grace: time.Hour, Lookback: 1}, quiet())
	testenv.Must(t, err, "new invoicer")
	accts, err := e.store.Accounts(ctx)
	testenv.Must(t, err, "accounts")
	invs, err := iv.ComputePeriod(ctx, e.usage, invoicer.MonthPeriod(march, time.UTC), accts, april.Add(2*time.Hour))
	testenv.Must(t, err, "compute")
	testenv.Must(t, e.store.SaveDrafts(ctx, invs), "save")
	other := invs[0]
	extra := other.Lines[len(other.Lines)-1]
	extra.No = len(other.Lines) + 1
	other.Lines = append(append([]invoicer.Line(nil), other.Lines...), extra)
	testenv.Must(t, e.store.SaveDrafts(ctx, []invoicer.Invoice{other}), "save the other computation")
	var lines int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM invoice_lines WHERE invoice_id = $1`, invs[0].ID).Scan(&lines), "count lines")
	if lines != len(invs[0].Lines) {
		t.Errorf("invoice_lines holds %d lines for the invoice, want its own %d", lines, len(invs[0].Lines))
	}
}

// A watermark that falls behind by more than the grace holds back every
// period that ends meanwhile: Once says so, where it said nothing and a
// stalled ingest showed only as invoices that never came.
func TestAWatermarkBehindByMoreThanTheGraceIsLogged(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	now := april.AddDate(0, 0, 3)
	var logged bytes.Buffer
	iv, err := invoicer.New(e.store, e.usage, e.usage, nil, invoicer.Options{Grace: time.Hour, Lookback: 2,
		Now: func() time.Time { return now }}, slog.New(slog.NewTextHandler(&logged, nil)))
	testenv.Must(t, err, "new invoicer")
	e.watermark(t, now.Add(-30*time.Minute))
	testenv.Must(t, iv.Once(ctx), "once, inside the grace")
	if strings.Contains(logged.String(), "watermark is behind") {
		t.Fatalf("a watermark inside the grace was reported:\n%s", logged.String())
	}
	e.watermark(t, now.Add(-3*time.Hour))
	testenv.Must(t, iv.Once(ctx), "once, behind")
	if !strings.Contains(logged.String(), "level=WARN msg=\"usage watermark is behind") || !strings.Contains(logged.String(), "behind=3h0m0s") {
		t.Fatalf("a watermark 3 h behind (grace 1 h) was not reported:\n%s", logged.String())
	}
}

// A free version published after a period ended does not price it: the
// close after 2 April reads free v2 from Postgres with when it was
// published, and March's free time stays on v1, which charges nothing.
func TestAFreeVersionPublishedAfterThePeriodDoesNotPriceIt(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.account(t, "acct_nosub", "UTC")
	e.events(t, ev{account: "acct_nosub", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 500})
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition, created_at) VALUES
		('free', 2, 'Free', 'usd', '{"limits":{"requests_per_second":5,"burst":10,"monthly_requests":1000},
		  "prices":[{"key":"api_calls","model":"per_unit","meter":"api_calls","unit_amount":"1"}]}', $1)`, april.AddDate(0, 0, 1))
	testenv.Must(t, err, "publish free v2 on 2 April")
	e.watermark(t, april.Add(2*time.Hour))
	res, err := e.aprilInvoicer(t, e.usage, nil).CloseDue(ctx)
	testenv.Must(t, err, "close")
	var march1 bool
	for _, inv := range res.Closed {
		if !inv.Period.Start.Equal(march) {
			continue
		}
		march1 = true
		seg := inv.Fingerprint.Segments[0]
		if inv.Total != 0 || seg.PlanID != "free" || seg.PlanVersion != 1 {
			t.Errorf("March's free time: total %d under %s v%d; want 0 under free v1, in force in March", inv.Total, seg.PlanID, seg.PlanVersion)
		}
	}
	if !march1 {
		t.Fatalf("March was not closed: %+v", res)
	}
}

// A free version refused as written (a typo, fixed by the next version)
// fails only the free time it prices: an account on a paid plan the whole
// period closes, and so does one whose free time came after the fix.
// Before, every account's close loaded and read every free version, and
// one refused version stopped every invoice for good (plans are append
// only).
func TestARefusedFreeVersionFailsOnlyTheTimeItPrices(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition, created_at) VALUES
		('free', 2, 'Free', 'usd', '{"prices":[{"key":"api_calls","model":"per_unit","meter":"api_calls","unit_amount":"0","include":1000}]}', $1),
		('free', 3, 'Free', 'usd', '{"prices":[{"key":"api_calls","model":"per_unit","meter":"api_calls","unit_amount":"0"}]}', $2)`,
		march.AddDate(0, -2, 0), march.AddDate(0, -2, 1))
	testenv.Must(t, err, "publish free v2 (a typo) and v3 (the fix)")
	e.starter(t, "acct_paid", 10)
	e.account(t, "acct_free_now", "UTC")
	e.watermark(t, april.Add(2*time.Hour))
	res, err := e.aprilInvoicer(t, e.usage, nil).CloseDue(ctx)
	testenv.Must(t, err, "close")
	closed := map[string]bool{}
	for _, inv := range res.Closed {
		if inv.Period.Start.Equal(march) {
			closed[inv.AccountID] = true
		}
	}
	if !closed["acct_paid"] || !closed["acct_free_now"] {
		t.Fatalf("March closed for %v, failed %v; want both accounts (neither has time under free v2)", closed, res.Failed)
	}
}

// Replay proves an invoice under the plan version as it was billed, even
// when this version's strict reader refuses its definition (an extra key
// written before definitions were read strictly; plans are append only, so
// it cannot be mended).
func TestReplayReadsAPlanAsItWasBilled(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('legacy', 1, 'Legacy', 'usd',
		'{"prices": [{"key": "base", "model": "flat", "amount": 500}]}')`)
	testenv.Must(t, err, "insert plan")
	e.account(t, "acct_old", "UTC")
	e.subscribe(t, "acct_old", "legacy", march.AddDate(0, -1, 0), nil)
	e.watermark(t, april.Add(2*time.Hour))
	iv := e.aprilInvoicer(t, e.usage, nil)
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) == 0 {
		t.Fatal("nothing closed")
	}
	// A row as an earlier version let it be written.
	_, err = e.pg.Pool.Exec(ctx, `ALTER TABLE plans DISABLE TRIGGER plans_append_only;
		UPDATE plans SET definition = definition || '{"features": ["Email support"]}' WHERE id = 'legacy';
		ALTER TABLE plans ENABLE TRIGGER plans_append_only`)
	testenv.Must(t, err, "an old plan row")
	invs, err := e.store.ClosedInvoices(ctx, time.Time{}, time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC))
	testenv.Must(t, err, "ledger")
	out, err := iv.Audit(ctx, e.usage, nil, invs, nil)
	testenv.Must(t, err, "audit")
	for _, r := range out {
		if !r.Match || r.Result != invoicer.ResultMatch {
			t.Errorf("%+v, want a match", r)
		}
	}
}

// Two instances that each made a Stripe customer for one account (their
// asks shared no key and Stripe's search had not caught up) record the
// first: the one that lost sends its invoice to the recorded customer,
// under which every later run looks for it, not to its own.
func TestAnInvoiceGoesToTheRecordedCustomer(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_race", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	sc := stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL})
	// The other instance's customer; its metadata names another account
	// so that this instance's search does not find it.
	other, err := sc.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: "acct_race_elsewhere", Name: "acct_race",
		Email: "acct_race@example.test", IdempotencyKey: "the-other-instance"})
	testenv.Must(t, err, "the other instance's customer")
	var once sync.Once
	fake.SetHook(func(kind, phase string) {
		if kind == "customer" && phase == "after" {
			once.Do(func() { // the other instance records its customer first
				_, err := e.pg.Pool.Exec(ctx, `INSERT INTO stripe_customers (account_id, customer_id) VALUES ('acct_race', $1)`, other)
				testenv.Must(t, err, "record the other customer")
			})
		}
	})
	iv := e.aprilInvoicer(t, e.usage, sc)
	closeOne(t, iv)
	testenv.Must(t, iv.SyncStripe(ctx), "sync")
	stored, _, err := e.store.StripeCustomer(ctx, "acct_race")
	testenv.Must(t, err, "recorded customer")
	invs := fake.Invoices()
	if stored != other || len(invs) != 1 || invs[0].Customer != other {
		var got []string
		for _, inv := range invs {
			got = append(got, inv.Customer)
		}
		t.Fatalf("recorded customer %s, Stripe invoices for %v; want one, for %s", stored, got, other)
	}
}

// An account whose Stripe customer was deleted in Stripe gets a new one,
// recorded in place of the old: before, every invoice of the account
// failed its sync for good ("No such customer"), and the recorded customer
// could not be changed (the table is append-only).
func TestAnAccountWhoseStripeCustomerWasDeletedGetsANewOne(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_gone", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	sc := stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL})
	// The account's customer, made by an earlier invoice, then deleted in
	// Stripe's dashboard.
	gone, err := sc.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: "acct_gone", Name: "acct_gone", IdempotencyKey: "an-earlier-run"})
	testenv.Must(t, err, "the earlier customer")
	_, err = e.pg.Pool.Exec(ctx, `INSERT INTO stripe_customers (account_id, customer_id) VALUES ('acct_gone', $1)`, gone)
	testenv.Must(t, err, "record the earlier customer")
	fake.DeleteCustomer(gone)
	iv := e.aprilInvoicer(t, e.usage, sc)
	res := closeOne(t, iv)
	testenv.Must(t, iv.SyncStripe(ctx), "sync")
	testenv.Must(t, iv.SyncStripe(ctx), "sync again")
	cust, replacement, err := e.store.StripeCustomer(ctx, "acct_gone")
	testenv.Must(t, err, "recorded customer")
	invs := fake.Invoices()
	if cust == gone || !replacement || len(invs) != 1 || invs[0].Customer != cust || invs[0].Status != "open" ||
		invs[0].Metadata["tollgate_invoice_id"] != res.Closed[0].ID {
		t.Fatalf("recorded customer %s (a replacement: %v), Stripe invoices %+v; want one open invoice for a new customer in place of %s",
			cust, replacement, invs, gone)
	}
	var synced int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE invoice_id = $1 AND kind = 'invoice.synced'`,
		res.Closed[0].ID).Scan(&synced), "synced entries")
	if synced != 1 {
		t.Errorf("%d invoice.synced entries, want 1", synced)
	}
	// A second instance that replaces the same customer records nothing
	// new: the first replacement recorded wins.
	again, err := e.store.ReplaceStripeCustomer(ctx, "acct_gone", gone, "cus_another_instance")
	if err != nil || again != cust {
		t.Errorf("a second replacement of %s: %s, %v; want the first one recorded, %s", gone, again, err, cust)
	}
	// A customer already in the account's chain is refused: a loop would
	// leave no customer to read, and every later sync failing.
	if got, err := e.store.ReplaceStripeCustomer(ctx, "acct_gone", cust, gone); err == nil {
		t.Errorf("the new customer replaced by the first one: %s recorded, want refused", got)
	}
	if now, _, err := e.store.StripeCustomer(ctx, "acct_gone"); err != nil || now != cust {
		t.Errorf("the account's customer after a refused loop: %s, %v; want %s", now, err, cust)
	}
}

// Stripe answers "No such customer" for a key of the other mode, or of
// another Stripe account, too: a customer Stripe does not hold as deleted
// is not replaced, or a key set by mistake would give every account a new
// customer (and, with the right key back, a loop of replacements).
func TestACustomerUnknownToTheKeyIsNotReplaced(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_other_mode", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO stripe_customers (account_id, customer_id) VALUES ('acct_other_mode', 'cus_made_under_another_key')`)
	testenv.Must(t, err, "record a customer the key does not know")
	iv := e.aprilInvoicer(t, e.usage, stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL}))
	closeOne(t, iv)
	err = iv.SyncStripe(ctx)
	if err == nil || !strings.Contains(err.Error(), "unknown to this Stripe key") {
		t.Errorf("sync: %v, want it refused, naming the unknown customer", err)
	}
	cust, replacement, err := e.store.StripeCustomer(ctx, "acct_other_mode")
	if err != nil || cust != "cus_made_under_another_key" || replacement || fake.Customers() != 0 || len(fake.Invoices()) != 0 {
		t.Errorf("after the sync: customer %s (a replacement: %v, %v), %d Stripe customers, %d invoices; want the recorded one kept and nothing made",
			cust, replacement, err, fake.Customers(), len(fake.Invoices()))
	}
}

// closeOne closes the due periods and fails unless exactly one invoice
// was closed.
func closeOne(t *testing.T, iv *invoicer.Invoicer) invoicer.CloseResult {
	t.Helper()
	res, err := iv.CloseDue(context.Background())
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 {
		t.Fatalf("%d invoices closed, want 1", len(res.Closed))
	}
	return res
}

// Invoices finalized while no Stripe key was set stay in the ledger: a key
// set later sends what is finalized from then on, instead of creating and
// charging every past invoice at once.
func TestAStripeKeySetLaterSendsOnlyWhatIsFinalizedFromThenOn(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	before := e.marchInvoice(t, "acct_before_key") // closed with no key set
	if inv, err := e.store.Invoice(ctx, before); err != nil || inv.Total <= 0 {
		t.Fatalf("the invoice closed without a key: %+v, %v; the test needs a positive total", inv, err)
	}
	e.starter(t, "acct_after_key", 10)
	fake := stripetest.New()
	defer fake.Close()
	iv := e.aprilInvoicer(t, e.usage, stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL}))
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close with a key set")
	if len(res.Closed) != 1 || res.Closed[0].AccountID != "acct_after_key" {
		t.Fatalf("closed %+v, want the one account closed after the key was set", res.Closed)
	}
	testenv.Must(t, iv.SyncStripe(ctx), "sync")
	testenv.Must(t, iv.SyncStripe(ctx), "sync again")
	invs := fake.Invoices()
	if len(invs) != 1 || invs[0].Metadata["tollgate_invoice_id"] != res.Closed[0].ID {
		var got []string
		for _, inv := range invs {
			got = append(got, inv.Metadata["tollgate_invoice_id"])
		}
		t.Fatalf("Stripe holds invoices for %v, want only %s (not %s, finalized before the key)", got, res.Closed[0].ID, before)
	}
	var synced int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE invoice_id = $1 AND kind = 'invoice.synced'`, before).Scan(&synced), "synced entries")
	if synced != 0 {
		t.Errorf("the invoice finalized before the key has %d invoice.synced entries, want none", synced)
	}
}

// A ledger synced with a test-mode key refuses a live one (and the other
// way round): test-mode customers are not live ones, and invoices synced
// in test mode were never charged. Closing goes on; only the sync refuses.
func TestAStripeKeyOfTheOtherModeIsRefused(t *testing.T) {
	for key, want := range map[string]string{"sk_live_a": "live", "rk_live_b": "live", "sk_test_c": "test", "rk_test_d": "test", "sk_e": "", "": ""} {
		if got := invoicer.StripeKeyMode(key); got != want {
			t.Errorf("StripeKeyMode(%q) = %q, want %q", key, got, want)
		}
	}
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_mode", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	sc := stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL})
	inMode := func(mode string) *invoicer.Invoicer {
		iv, err := invoicer.New(e.store, e.usage, e.usage, sc, invoicer.Options{Grace: time.Hour, Lookback: 1,
			Now: func() time.Time { return april.AddDate(0, 0, 3) }, StripeMode: mode}, quiet())
		testenv.Must(t, err, "new invoicer")
		return iv
	}
	test := inMode("test")
	res, err := test.CloseDue(ctx)
	testenv.Must(t, err, "close in test mode")
	testenv.Must(t, test.SyncStripe(ctx), "sync in test mode")
	if len(res.Closed) != 1 || len(fake.Invoices()) != 1 {
		t.Fatalf("closed %d, Stripe holds %d; want 1 and 1", len(res.Closed), len(fake.Invoices()))
	}
	live := inMode("live")
	if err := live.SyncStripe(ctx); !errors.Is(err, invoicer.ErrStripeMode) {
		t.Fatalf("sync with a live key on a test-mode ledger: %v, want ErrStripeMode", err)
	}
	e.starter(t, "acct_mode_next", 10)
	res, err = live.CloseDue(ctx)
	testenv.Must(t, err, "close with a key of the other mode")
	if len(res.Closed) != 1 || len(fake.Invoices()) != 1 {
		t.Fatalf("closed %d, Stripe holds %d; want the close to go on and nothing more sent", len(res.Closed), len(fake.Invoices()))
	}
	testenv.Must(t, inMode("test").SyncStripe(ctx), "sync in test mode again")
	if len(fake.Invoices()) != 2 {
		t.Fatalf("Stripe holds %d invoices after a sync in the ledger's mode, want 2", len(fake.Invoices()))
	}
}

// Replay checks the ledger's own records of an invoice (the row's total
// and hash, its lines, its draft and finalized entries) against the
// document it proves. Before, it read the document alone: an invoice row
// whose total was set to 0 (which Stripe sync acts on, so it was never
// billed) was proved "match", and so was a document rewritten under
// another plan with a hash to fit, though the draft entry kept the
// original.
func TestReplayChecksTheLedgersRecordsAgainstTheDocument(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, a := range []string{"acct_kept", "acct_row", "acct_doc"} {
		e.starter(t, a, 40)
	}
	e.watermark(t, april.Add(2*time.Hour))
	iv := e.aprilInvoicer(t, e.usage, nil)
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 3 {
		t.Fatalf("closed %d invoices, want 3", len(res.Closed))
	}
	audit := func() map[string]invoicer.AuditResult {
		t.Helper()
		invs, err := e.store.ClosedInvoices(ctx, time.Time{}, time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC))
		testenv.Must(t, err, "ledger")
		out, err := iv.Audit(ctx, e.usage, nil, invs, nil)
		testenv.Must(t, err, "audit")
		by := map[string]invoicer.AuditResult{}
		for _, r := range out {
			by[r.AccountID] = r
		}
		return by
	}
	for a, r := range audit() {
		if r.Result != invoicer.ResultMatch || r.LedgerTotal <= 0 {
			t.Fatalf("%s before any change: %+v, want a match of a positive total", a, r)
		}
	}

	tamper := func(sql string, args ...any) {
		t.Helper()
		_, err := e.pg.Pool.Exec(ctx, `ALTER TABLE invoices DISABLE TRIGGER invoices_append_only`)
		testenv.Must(t, err, "disable the trigger")
		_, err = e.pg.Pool.Exec(ctx, sql, args...)
		testenv.Must(t, err, "change the ledger")
		_, err = e.pg.Pool.Exec(ctx, `ALTER TABLE invoices ENABLE TRIGGER invoices_append_only`)
		testenv.Must(t, err, "enable the trigger")
	}
	tamper(`UPDATE invoices SET total_minor = 0 WHERE account_id = 'acct_row'`)
	// The document, row and hash rewritten as the free plan would have
	// billed the same usage, consistent with one another.
	var doc invoicer.Invoice
	for _, inv := range res.Closed {
		if inv.AccountID == "acct_doc" {
			doc = inv
		}
	}
	free, err := e.store.Plan(ctx, "free", 1)
	testenv.Must(t, err, "free plan")
	forged, err := invoicer.Compute(invoicer.Inputs{AccountID: doc.AccountID, Currency: doc.Currency, Period: doc.Period,
		Segments: []invoicer.Segment{{Period: doc.Period, Plan: free}}, Usage: []map[string]int64{doc.Fingerprint.Segments[0].Quantities},
		EventCount: doc.Fingerprint.EventCount, Watermark: doc.Fingerprint.Watermark})
	testenv.Must(t, err, "compute under free")
	forged.ID = doc.ID
	b, err := json.Marshal(forged)
	testenv.Must(t, err, "encode")
	tamper(`UPDATE invoices SET document = $1, total_minor = $2, fingerprint_hash = $3 WHERE account_id = 'acct_doc'`,
		b, forged.Total, forged.Fingerprint.Hash)

	by := audit()
	if r := by["acct_kept"]; r.Result != invoicer.ResultMatch {
		t.Errorf("the unchanged invoice: %+v, want a match", r)
	}
	for a, want := range map[string]string{"acct_row": "recorded total", "acct_doc": "recorded invoice.draft entry"} {
		r := by[a]
		if r.Result != invoicer.ResultDifferent || r.Match || !strings.Contains(strings.Join(r.Differences, "; "), want) {
			t.Errorf("%s after its ledger was changed: %+v, want different, naming the %s", a, r, want)
		}
	}
}

// A sync part-way through when the ledger first records when it began
// syncing (a ledger from before that record, which never finished a sync:
// the record then starts now) is finished. Before, the invoice, finalized
// before that start, was left as a draft in Stripe for good.
func TestASyncBegunBeforeTheSyncStartIsFinished(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.starter(t, "acct_half", 10)
	e.watermark(t, april.Add(2*time.Hour))
	fake := stripetest.New()
	defer fake.Close()
	iv := e.aprilInvoicer(t, e.usage, stripe.New(stripe.Config{APIKey: "sk_test_x", URL: fake.URL}))
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 {
		t.Fatalf("closed %d invoices, want 1", len(res.Closed))
	}
	fake.SetHook(func(kind, phase string) {
		if kind == "finalize" && phase == "before" {
			panic(http.ErrAbortHandler) // the sync stops with a draft in Stripe
		}
	})
	if err := iv.SyncStripe(ctx); err == nil {
		t.Fatal("a sync cut at the finalize step succeeded")
	}
	fake.SetHook(nil)
	// As the ledger stood before the start was recorded: the migration
	// that added it recorded none, since no invoice.synced entry existed.
	_, err = e.pg.Pool.Exec(ctx, `DELETE FROM stripe_sync_start`)
	testenv.Must(t, err, "forget the start")
	testenv.Must(t, iv.SyncStripe(ctx), "sync")
	invs := fake.Invoices()
	if len(invs) != 1 || invs[0].Status != "open" || invs[0].Metadata["tollgate_invoice_id"] != res.Closed[0].ID {
		t.Fatalf("Stripe holds %+v; want the one invoice, finalized (open)", invs)
	}
	var synced int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE invoice_id = $1 AND kind = 'invoice.synced'`,
		res.Closed[0].ID).Scan(&synced), "synced entries")
	if synced != 1 {
		t.Fatalf("%d invoice.synced entries, want 1", synced)
	}
}

// A status entry an earlier version wrote for another Stripe invoice that
// named this one in its metadata counts for nothing: the invoice is not
// void, and its credit notes are still sent.
func TestAStatusOfAnotherStripeInvoiceCountsForNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.marchInvoice(t, "acct_copied")
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "invoice", "in_real", nil), "invoice step")
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "finalize", "in_real", nil), "finalize step")
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
		SELECT account_id, 'stripe.invoice.voided', id, total_minor, currency, '{"stripe_event_id": "evt_old", "stripe_object_id": "in_copy"}'
		FROM invoices WHERE id = $1`, id)
	testenv.Must(t, err, "an earlier version's entry for a copy")
	_, err = e.store.AppendCreditNote(ctx, id, 100, "goodwill", "")
	testenv.Must(t, err, "credit note")
	inv, err := e.store.Invoice(ctx, id)
	testenv.Must(t, err, "invoice")
	notes, err := e.store.UnsyncedCreditNotes(ctx)
	testenv.Must(t, err, "credit notes to send")
	if inv.Status == invoicer.StatusVoid || len(notes) != 1 {
		t.Fatalf("status %s, %d credit notes to send; want not void, and the one", inv.Status, len(notes))
	}
}

// An event of our own Stripe invoice that comes before the sync has
// recorded which one it is (a sync resumed after a crash, the invoice
// finalized and paid in Stripe meanwhile) counts once the sync records it.
func TestAnEventOfOursBeforeTheSyncRecordsItCountsOnceItDoes(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.marchInvoice(t, "acct_resumed")
	_, err := e.store.RecordWebhook(ctx, invoicer.WebhookEvent{ID: "evt_early", Type: "invoice.paid", InvoiceID: id, ObjectID: "in_ours", Payload: []byte(`{}`)})
	testenv.Must(t, err, "record the early event")
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "invoice", "in_ours", nil), "the resumed sync's invoice step")
	testenv.Must(t, e.store.SaveSyncStep(ctx, id, "finalize", "in_ours", nil), "finalize step")
	testenv.Must(t, e.store.MarkSynced(ctx, id, "in_ours", "https://pay.example/x"), "mark synced")
	inv, err := e.store.Invoice(ctx, id)
	testenv.Must(t, err, "invoice")
	if inv.Status != invoicer.StatusPaid {
		t.Fatalf("status %s, want paid: the event came before the step, and is ours", inv.Status)
	}
}

// A subscription no longer in force for any of a period (a later one won)
// does not fail the period when its plan version is refused: only the plan
// that prices the time is loaded. Before, every plan in force was loaded,
// and an account that moved off a refused version could never be invoiced.
func TestASupersededRefusedPlanDoesNotFailTheClose(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('typo', 1, 'Typo', 'usd',
		'{"prices": [{"key": "base", "model": "flat", "amount": 1000, "meter": "api_calls"}]}')`)
	testenv.Must(t, err, "a refused plan version")
	e.account(t, "acct_moved_on", "UTC")
	e.subscribe(t, "acct_moved_on", "typo", march.AddDate(0, -1, 0), nil)
	e.subscribe(t, "acct_moved_on", "starter", march.AddDate(0, 0, -10), nil)
	e.events(t, ev{account: "acct_moved_on", env: "live", typ: "api_call", at: march.Add(time.Hour), n: 10})
	e.watermark(t, april.Add(2*time.Hour))
	res, err := e.aprilInvoicer(t, e.usage, nil).CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 || res.Closed[0].Fingerprint.Segments[0].PlanID != "starter" {
		t.Fatalf("closed %+v, failed %v; want March, all on starter", res.Closed, res.Failed)
	}
}

// Limits are the edge's business: a stored plan version whose quota is
// negative (the edge reads it as none) is invoiced and replayed like any
// other. Refusing it when a definition is read stopped every close of its
// accounts, while the edge went on serving them.
func TestAPlanWithANegativeQuotaIsStillInvoiced(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	def := `{"limits":{"requests_per_second":5,"burst":10,"monthly_requests":-1},"prices":[{"key":"base","model":"flat","amount":2900}]}`
	_, err := e.pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('unlimited_quota', 1, 'Unlimited', 'usd', $1)`, def)
	testenv.Must(t, err, "insert the plan")
	if _, err := invoicer.ParseBilledDefinition([]byte(def)); err != nil {
		t.Fatalf("replay cannot read the plan: %v", err)
	}
	e.account(t, "acct_unlimited_quota", "UTC")
	e.subscribe(t, "acct_unlimited_quota", "unlimited_quota", march.AddDate(0, -1, 0), nil)
	e.watermark(t, april.Add(2*time.Hour))
	res, err := e.aprilInvoicer(t, e.usage, nil).CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 1 || res.Closed[0].Total != 2900 || len(res.Failed) != 0 {
		t.Fatalf("closed %+v, failed %v; want the account's March invoice of 2900", res.Closed, res.Failed)
	}
}

// A paid invoice a stray voided event comes after stays paid (the status
// rule), and its credit notes are still sent to Stripe, as the status
// says they may be. Voided first, it is void and they are not.
func TestCreditNotesFollowTheFirstFinalStatus(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, c := range []struct {
		account string
		events  []string
		status  invoicer.Status
		sent    int
	}{
		{"acct_paid_first", []string{"invoice.paid", "invoice.voided"}, invoicer.StatusPaid, 1},
		{"acct_void_first", []string{"invoice.voided", "invoice.paid"}, invoicer.StatusVoid, 0},
	} {
		id := e.marchInvoice(t, c.account)
		stripeID := "in_" + c.account
		testenv.Must(t, e.store.SaveSyncStep(ctx, id, "invoice", stripeID, nil), "invoice step")
		testenv.Must(t, e.store.SaveSyncStep(ctx, id, "finalize", stripeID, nil), "finalize step")
		for i, typ := range c.events {
			_, err := e.store.RecordWebhook(ctx, invoicer.WebhookEvent{ID: fmt.Sprintf("evt_%s_%d", c.account, i), Type: typ,
				InvoiceID: id, ObjectID: stripeID, Payload: []byte(`{}`)})
			testenv.Must(t, err, "record "+typ)
		}
		_, err := e.store.AppendCreditNote(ctx, id, 100, "goodwill", "")
		testenv.Must(t, err, "credit note")
		inv, err := e.store.Invoice(ctx, id)
		testenv.Must(t, err, "invoice")
		notes, err := e.store.UnsyncedCreditNotes(ctx)
		testenv.Must(t, err, "credit notes to send")
		sent := 0
		for _, n := range notes {
			if n.InvoiceID == id {
				sent++
			}
		}
		if inv.Status != c.status || sent != c.sent {
			t.Errorf("%s then %s: status %s, %d credit notes to send; want %s and %d", c.events[0], c.events[1], inv.Status, sent, c.status, c.sent)
		}
	}
}
