package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/invoicer/api"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	"github.com/tollgate-dev/tollgate/invoicer/stripe"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

type fixture struct {
	srv   *httptest.Server
	pg    *testenv.Postgres
	keys  *edgepg.KeyStore
	store *invpg.Store
}

func (f *fixture) key(t *testing.T, account string, kind edge.KeyKind, env schemas.Environment, scopes ...string) (string, string) {
	t.Helper()
	secret, parsed, err := edge.GenerateKey(kind, env)
	testenv.Must(t, err, "generate key")
	id := "key_" + uuid.NewString()[:8]
	testenv.Must(t, f.keys.CreateKey(context.Background(), edge.NewKey{ID: id, AccountID: account, Parsed: parsed, Scopes: scopes}), "create key")
	return secret, id
}

func (f *fixture) get(t *testing.T, key, path string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, f.srv.URL+path, nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "get "+path)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s: %d %s: %v", path, resp.StatusCode, b, err)
		}
	}
	return resp.StatusCode
}

type apiErr struct {
	Error struct {
		Type      string `json:"type"`
		Code      string `json:"code"`
		Message   string `json:"message"`
		RequestID string `json:"request_id"`
		DocURL    string `json:"doc_url"`
	} `json:"error"`
}

func TestInvoiceAPI(t *testing.T) {
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	f := &fixture{pg: pg, keys: edgepg.NewKeyStore(pg.Pool), store: invpg.New(pg.Pool)}
	// The invoicer and the API run on a clock moved off a month boundary:
	// on the wall clock, a run in a month's last moments would ask the API
	// about the month after the one it set up as current, and one in a
	// month's first second would neither close the previous month (the
	// watermarks table keeps whole seconds) nor see the calls placed a
	// second into the current one.
	shift := testenv.MonthClockShift(time.Now(), time.UTC, 10*time.Minute)
	clock := func() time.Time { return time.Now().Add(shift) }
	now := clock().UTC()
	cur := invoicer.MonthPeriod(now, time.UTC)
	prev := invoicer.MonthPeriod(cur.Start.Add(-time.Second), time.UTC)
	for _, a := range []string{"acct_x", "acct_y"} {
		testenv.Must(t, f.keys.EnsureAccount(ctx, a, a), "account")
		_, err := pg.Pool.Exec(ctx, `UPDATE accounts SET created_at = $2 WHERE id = $1`, a, prev.Start)
		testenv.Must(t, err, "backdate account")
		_, err = pg.Pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at) VALUES ($1, $2, 'starter', 1, $3)`,
			"sub_"+a, a, prev.Start)
		testenv.Must(t, err, "subscribe")
	}
	insertUnits := func(account, env string, at time.Time, n int, units int64) {
		b, err := ch.Conn.PrepareBatch(ctx, `INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
			event_type, timestamp, timestamp_us, units, kafka_partition, kafka_offset, ingested_at)`)
		testenv.Must(t, err, "prepare")
		for i := 0; i < n; i++ {
			testenv.Must(t, b.Append(uuid.New(), uint8(1), account, env, "k", "api_call", at.Truncate(time.Second), uint64(at.UnixMicro()),
				units, int32(0), int64(i), now), "append")
		}
		testenv.Must(t, b.Send(), "insert")
	}
	insert := func(account, env string, at time.Time, n int) { insertUnits(account, env, at, n, 1) }
	insert("acct_x", "live", prev.Start.Add(time.Hour), 12)
	insert("acct_y", "live", prev.Start.Add(time.Hour), 5)
	insert("acct_x", "live", cur.Start.Add(time.Second), 7)
	insert("acct_x", "test", cur.Start.Add(time.Second), 3)
	// acct_y's units this period add up past int64 (stored as such).
	insertUnits("acct_y", "live", cur.Start.Add(time.Second), 2, 5e18)
	wb, err := ch.Conn.PrepareBatch(ctx, "INSERT INTO watermarks (partition, watermark, updated_at)")
	testenv.Must(t, err, "prepare watermark")
	testenv.Must(t, wb.Append(int32(0), now, now), "append watermark")
	testenv.Must(t, wb.Send(), "watermark")

	usage := invch.New(ch.Conn)
	iv, err := invoicer.New(f.store, usage, usage, nil, invoicer.Options{Grace: time.Nanosecond, Lookback: 1, Now: clock}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	testenv.Must(t, err, "invoicer")
	res, err := iv.CloseDue(ctx)
	testenv.Must(t, err, "close")
	if len(res.Closed) != 2 {
		t.Fatalf("closed %d invoices, want 2", len(res.Closed))
	}
	h := api.New(f.keys, f.store, usage, iv, &stripe.Verifier{Secret: "whsec_api"},
		[]meter.Meter{meter.Default(), {Key: "units", EventType: "api_call", Aggregation: meter.Sum, Value: "units"}},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	h.SetClock(clock)
	audit, err := edgepg.NewAuditWriter(pg.Pool, time.Hour, nil, slog.New(slog.NewTextHandler(io.Discard, nil))) // flushed below
	testenv.Must(t, err, "audit writer")
	defer audit.Close()
	h.SetAuditor(audit)
	trusted, err := edge.ParseTrustedProxies("invoicer.trusted_proxies", []string{"127.0.0.1"}) // the dashboard's address
	testenv.Must(t, err, "trusted proxies")
	h.SetTrustedProxies(trusted)
	f.srv = httptest.NewServer(h)
	defer f.srv.Close()

	secretX, _ := f.key(t, "acct_x", edge.Secret, schemas.Live)
	secretY, _ := f.key(t, "acct_y", edge.Secret, schemas.Live)
	publishable, _ := f.key(t, "acct_x", edge.Publishable, schemas.Live)
	testSecret, _ := f.key(t, "acct_x", edge.Secret, schemas.Test)

	t.Run("a wrong method is a 405 naming the methods a path takes, not a 404", func(t *testing.T) {
		for _, path := range []string{"/v1/usage/current", "/v1/invoices/upcoming", "/v1/invoices", "/v1/invoices/inv_202601_x", "/healthz"} {
			edgetest.CheckOtherMethods(t, f.srv.URL+path, secretX, http.MethodGet)
		}
		edgetest.CheckOtherMethods(t, f.srv.URL+"/v1/webhooks/stripe", "", http.MethodPost)
	})

	t.Run("no answer about an account is kept in a cache", func(t *testing.T) {
		for _, c := range []struct{ key, path string }{
			{secretX, "/v1/invoices"}, {secretX, "/v1/usage/current"}, {secretX, "/v1/invoices/upcoming"},
			{secretX, "/v1/invoices/inv_missing"}, {"sk_live_not_a_key", "/v1/invoices"},
		} {
			req, _ := http.NewRequest("GET", f.srv.URL+c.path, nil)
			req.Header.Set("Authorization", "Bearer "+c.key)
			resp, err := http.DefaultClient.Do(req)
			testenv.Must(t, err, "call "+c.path)
			resp.Body.Close()
			if got := resp.Header.Get("Cache-Control"); got != "no-store" {
				t.Errorf("%s (status %d): Cache-Control %q, want no-store", c.path, resp.StatusCode, got)
			}
		}
	})
	t.Run("current usage separates live from test", func(t *testing.T) {
		var u api.CurrentUsage
		if code := f.get(t, secretX, "/v1/usage/current", &u); code != 200 {
			t.Fatalf("status %d", code)
		}
		if u.Live.Events != 7 || u.Live.Quantities["api_calls"] != 7 || u.Test.Quantities["api_calls"] != 3 || !u.Period.Start.Equal(cur.Start) {
			t.Errorf("usage: %+v", u)
		}
	})
	t.Run("current usage marks a sum past int64", func(t *testing.T) {
		var u api.CurrentUsage
		if code := f.get(t, secretY, "/v1/usage/current", &u); code != 200 {
			t.Fatalf("status %d", code)
		}
		if u.Live.Quantities["units"] != math.MaxInt64 || fmt.Sprint(u.Live.Overflow) != "[units]" {
			t.Errorf("acct_y's units %d, overflow %v; want int64's largest value, marked", u.Live.Quantities["units"], u.Live.Overflow)
		}
		var x api.CurrentUsage
		if f.get(t, secretX, "/v1/usage/current", &x); x.Live.Overflow != nil || x.Live.Quantities["units"] != 7 {
			t.Errorf("acct_x's units %d, overflow %v; want 7, unmarked", x.Live.Quantities["units"], x.Live.Overflow)
		}
	})
	t.Run("the projected invoice prices usage so far", func(t *testing.T) {
		var up api.Upcoming
		if code := f.get(t, secretX, "/v1/invoices/upcoming", &up); code != 200 {
			t.Fatalf("status %d", code)
		}
		if up.Total != 2900 || len(up.Lines) != 2 || up.Lines[1].Quantity != 7 {
			t.Errorf("upcoming: total %d lines %+v", up.Total, up.Lines)
		}
	})
	t.Run("past invoices list only the key's account, with lines", func(t *testing.T) {
		var l api.List
		if code := f.get(t, secretX, "/v1/invoices", &l); code != 200 {
			t.Fatalf("status %d", code)
		}
		if len(l.Data) != 1 || l.Data[0].AccountID != "acct_x" || l.Data[0].Total != 2900 || len(l.Data[0].Lines) != 2 ||
			l.Data[0].Lines[1].Quantity != 12 || l.Data[0].Status != invoicer.StatusFinalized {
			t.Fatalf("list: %+v", l.Data)
		}
		var one invoicer.StoredInvoice
		if code := f.get(t, secretX, "/v1/invoices/"+l.Data[0].ID, &one); code != 200 || one.ID != l.Data[0].ID {
			t.Errorf("get own invoice: %d %+v", code, one)
		}
		var e apiErr
		if code := f.get(t, secretY, "/v1/invoices/"+l.Data[0].ID, &e); code != 404 || e.Error.Code != "resource_missing" {
			t.Errorf("another account's invoice: %d %+v", code, e)
		}
		// Ids the ledger could never hold (Postgres refuses a NUL or bad
		// UTF-8 outright) are missing, not a server error.
		for _, id := range []string{"%00", "%FF", "inv%20x", strings.Repeat("x", 129)} {
			var e apiErr
			if code := f.get(t, secretX, "/v1/invoices/"+id, &e); code != 404 || e.Error.Code != "resource_missing" {
				t.Errorf("invoice id %q: %d %+v, want 404 resource_missing", id, code, e)
			}
		}
	})
	for _, c := range []struct {
		name, key string
		status    int
		code      string
	}{
		{"no key is unauthorized", "", 401, "missing_api_key"},
		{"a malformed key is unauthorized", "sk_live_nope", 401, "malformed_api_key"},
		{"a publishable key is forbidden", publishable, 403, "secret_key_required"},
		{"a test-mode secret key is forbidden: billing is live usage's", testSecret, 403, "live_key_required"},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, path := range []string{"/v1/invoices", "/v1/invoices/upcoming", "/v1/usage/current"} {
				var e apiErr
				if got := f.get(t, c.key, path, &e); got != c.status || e.Error.Code != c.code || e.Error.RequestID == "" || e.Error.DocURL == "" {
					t.Errorf("%s: got %d %+v", path, got, e)
				}
			}
		})
	}
	t.Run("refused keys are audited as the edge audits its own", func(t *testing.T) {
		audit.Flush(ctx)
		reasons := pg.Strings(t, `SELECT DISTINCT reason FROM audit_log WHERE action = $1 AND actor = 'invoice_api' ORDER BY reason`, edge.ActionAuthFailed)
		if fmt.Sprint(reasons) != "[malformed missing]" {
			t.Fatalf("audited reasons %v, want [malformed missing] (from the cases above)", reasons)
		}
	})
	t.Run("through a trusted proxy, the audit row names the caller it forwarded for", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, f.srv.URL+"/v1/invoices", nil)
		req.Header.Set("Authorization", "Bearer sk_live_nope")
		req.Header.Set("X-Forwarded-For", "6.6.6.6, 203.0.113.10")
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "call")
		resp.Body.Close()
		audit.Flush(ctx)
		remotes := pg.Strings(t, `SELECT DISTINCT remote_addr FROM audit_log WHERE actor = 'invoice_api' ORDER BY 1`)
		if resp.StatusCode != 401 || fmt.Sprint(remotes) != "[127.0.0.1 203.0.113.10]" {
			t.Fatalf("status %d, audited addresses %v; want 401 and the forwarded caller beside the direct calls' 127.0.0.1", resp.StatusCode, remotes)
		}
	})
	// A restricted key reads only what its scopes allow: invoices take
	// invoices:read, this period's usage usage:read (as the usage API).
	t.Run("a restricted key reads only what its scopes allow", func(t *testing.T) {
		eventsOnly, _ := f.key(t, "acct_x", edge.Secret, schemas.Live, "events:write")
		usageOnly, _ := f.key(t, "acct_x", edge.Secret, schemas.Live, "usage:read")
		invoicesOnly, _ := f.key(t, "acct_x", edge.Secret, schemas.Live, "invoices:read")
		for _, c := range []struct {
			key, path string
			want      int
		}{
			{eventsOnly, "/v1/invoices", 403}, {eventsOnly, "/v1/invoices/upcoming", 403},
			{eventsOnly, "/v1/invoices/" + res.Closed[0].ID, 403}, {eventsOnly, "/v1/usage/current", 403},
			{usageOnly, "/v1/invoices", 403}, {usageOnly, "/v1/invoices/upcoming", 403}, {usageOnly, "/v1/usage/current", 200},
			{invoicesOnly, "/v1/invoices", 200}, {invoicesOnly, "/v1/invoices/upcoming", 200}, {invoicesOnly, "/v1/usage/current", 403},
		} {
			var e apiErr
			got := f.get(t, c.key, c.path, &e)
			if got != c.want || (c.want == 403 && (e.Error.Code != "insufficient_scope" || e.Error.RequestID == "")) {
				t.Errorf("%s: got %d %+v, want %d", c.path, got, e, c.want)
			}
		}
	})
	t.Run("a 401 says how to authenticate", func(t *testing.T) {
		resp, err := http.Get(f.srv.URL + "/v1/invoices")
		testenv.Must(t, err, "call")
		resp.Body.Close()
		if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != edge.WWWAuthenticate {
			t.Fatalf("no key: %d, WWW-Authenticate %q; want 401 and %q, as the edge and the usage API answer",
				resp.StatusCode, resp.Header.Get("WWW-Authenticate"), edge.WWWAuthenticate)
		}
	})
	t.Run("webhooks are verified and recorded once", func(t *testing.T) {
		var l api.List
		f.get(t, secretX, "/v1/invoices", &l)
		// Another Stripe invoice naming this one in its metadata (a copy
		// made in Stripe's dashboard, a test-mode or another ledger's copy,
		// whose id is the same), before the sync has made this one's: its
		// events are kept, and change nothing. Before, a voided copy left
		// the invoice void for good, and its credit notes were never sent.
		payload := []byte(`{"id":"evt_api_stray","object":"event","type":"invoice.voided","livemode":false,"data":{"object":{"id":"in_copy",
			"object":"invoice","currency":"usd","amount_due":2900,"metadata":{"tollgate_invoice_id":"` + l.Data[0].ID + `"}}}}`)
		post := func(header string) (int, map[string]any) {
			req, _ := http.NewRequest(http.MethodPost, f.srv.URL+"/v1/webhooks/stripe", bytes.NewReader(payload))
			req.Header.Set("Stripe-Signature", header)
			resp, err := http.DefaultClient.Do(req)
			testenv.Must(t, err, "post webhook")
			defer resp.Body.Close()
			var out map[string]any
			_ = json.NewDecoder(resp.Body).Decode(&out)
			return resp.StatusCode, out
		}
		if code, out := post(webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_api"}).Header); code != 200 || out["duplicate"] != false {
			t.Fatalf("a copy's event: %d %v; want it taken", code, out)
		}
		// The sync made in_1 this invoice's Stripe invoice.
		testenv.Must(t, f.store.SaveSyncStep(ctx, l.Data[0].ID, "invoice", "in_1", nil), "record the sync's invoice step")
		var inv invoicer.StoredInvoice
		f.get(t, secretX, "/v1/invoices/"+l.Data[0].ID, &inv)
		if inv.Status == invoicer.StatusVoid {
			t.Fatalf("status %s after a copy's invoice.voided; want it not to count", inv.Status)
		}
		payload = []byte(`{"id":"evt_api_1","object":"event","type":"invoice.paid","data":{"object":{"id":"in_1","object":"invoice",
			"currency":"usd","amount_paid":2900,"metadata":{"tollgate_invoice_id":"` + l.Data[0].ID + `"}}}}`)
		signed := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_api"})
		if code, out := post(signed.Header); code != 200 || out["duplicate"] != false {
			t.Fatalf("first delivery: %d %v", code, out)
		}
		if code, out := post(signed.Header); code != 200 || out["duplicate"] != true {
			t.Fatalf("redelivery: %d %v", code, out)
		}
		bad := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_other"})
		if code, _ := post(bad.Header); code != 400 {
			t.Fatalf("bad signature: %d", code)
		}
		f.get(t, secretX, "/v1/invoices/"+l.Data[0].ID, &inv)
		if inv.Status != invoicer.StatusPaid {
			t.Errorf("status after invoice.paid: %s", inv.Status)
		}
		var n int
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger_entries WHERE kind = 'stripe.invoice.paid'`).Scan(&n), "count")
		if n != 1 {
			t.Errorf("ledger has %d invoice.paid entries, want 1", n)
		}

		// Valid JSON that Postgres's jsonb refuses (\u0000, from a field a
		// customer filled in) is kept as sent, not answered 500 for days.
		payload = []byte(`{"id":"evt_api_nul","object":"event","type":"customer.updated","data":{"object":{"id":"cus_1","object":"customer","name":"a\u0000b"}}}`)
		if code, out := post(webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_api"}).Header); code != 200 || out["duplicate"] != false {
			t.Fatalf("an event holding \\u0000: %d %v; want it taken", code, out)
		}
		var kept string
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT payload::text FROM stripe_webhook_events WHERE event_id = 'evt_api_nul'`).Scan(&kept), "read it back")
		if kept != string(payload) {
			t.Errorf("kept %q, want the event as sent", kept)
		}
	})
	// Last: it publishes a free version refused as written.
	t.Run("an upcoming invoice the operator's plans cannot price is a logged 503, not the caller's error", func(t *testing.T) {
		testenv.Must(t, f.keys.EnsureAccount(ctx, "acct_z", "acct_z"), "account")
		_, err := pg.Pool.Exec(ctx, `UPDATE accounts SET created_at = $1 WHERE id = 'acct_z'`, prev.Start)
		testenv.Must(t, err, "backdate account")
		_, err = pg.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition, created_at) VALUES
			('free', 2, 'Free', 'usd', '{"prices":[{"key":"api_calls","model":"per_unit","meter":"api_calls","unit_amount":"0","include":1000}]}', $1)`, prev.Start)
		testenv.Must(t, err, "publish a refused free version")
		secretZ, _ := f.key(t, "acct_z", edge.Secret, schemas.Live)
		var e apiErr
		if code := f.get(t, secretZ, "/v1/invoices/upcoming", &e); code != 503 || e.Error.Code != "billing_unavailable" ||
			strings.Contains(e.Error.Message, "include") {
			t.Fatalf("free account under a refused version: %d %+v", code, e.Error)
		}
		var up api.Upcoming
		if code := f.get(t, secretX, "/v1/invoices/upcoming", &up); code != 200 {
			t.Fatalf("an account on starter: %d", code)
		}
	})
	t.Run("the invoice list pages, newest first, within the account", func(t *testing.T) {
		testenv.Must(t, f.keys.EnsureAccount(ctx, "acct_pages", "acct_pages"), "account")
		var invs []invoicer.Invoice
		for m := 1; m <= 3; m++ {
			p := invoicer.MonthPeriod(time.Date(2025, time.Month(m), 1, 0, 0, 0, 0, time.UTC), time.UTC)
			invs = append(invs, invoicer.Invoice{ID: invoicer.InvoiceID("acct_pages", p), AccountID: "acct_pages", Currency: "usd", Period: p})
		}
		testenv.Must(t, f.store.SaveDrafts(ctx, invs), "save invoices")
		key, _ := f.key(t, "acct_pages", edge.Secret, schemas.Live)
		page := func(query string) api.List {
			t.Helper()
			var l api.List
			if code := f.get(t, key, "/v1/invoices"+query, &l); code != 200 {
				t.Fatalf("GET /v1/invoices%s: %d", query, code)
			}
			return l
		}
		all := page("")
		if len(all.Data) != 3 || all.HasMore || all.Data[0].ID != invs[2].ID || all.Data[2].ID != invs[0].ID {
			t.Fatalf("whole list: %d invoices, has_more %v", len(all.Data), all.HasMore)
		}
		first := page("?limit=2")
		if len(first.Data) != 2 || !first.HasMore || first.Data[0].ID != invs[2].ID || first.Data[1].ID != invs[1].ID {
			t.Fatalf("first page: %d invoices, has_more %v", len(first.Data), first.HasMore)
		}
		second := page("?limit=2&starting_after=" + first.Data[1].ID)
		if len(second.Data) != 1 || second.HasMore || second.Data[0].ID != invs[0].ID {
			t.Fatalf("second page: %d invoices, has_more %v", len(second.Data), second.HasMore)
		}
		var xs api.List
		f.get(t, secretX, "/v1/invoices", &xs)
		for _, q := range []struct{ query, code string }{
			{"?limit=0", "invalid_limit"}, {"?limit=101", "invalid_limit"}, {"?limit=two", "invalid_limit"},
			{"?starting_after=inv_nothing", "invalid_starting_after"},
			{"?starting_after=" + xs.Data[0].ID, "invalid_starting_after"}, // another account's
		} {
			var e apiErr
			if code := f.get(t, key, "/v1/invoices"+q.query, &e); code != 400 || e.Error.Code != q.code {
				t.Errorf("GET /v1/invoices%s: %d %q, want 400 %s", q.query, code, e.Error.Code, q.code)
			}
		}
	})
}
