package aggregator_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

const adminToken = "admin-token-for-tests"

type apiEnv struct {
	srv *httptest.Server
	api *aggregator.Server
	// ahead moves the server's clock forward, in nanoseconds.
	ahead atomic.Int64
	ch    *testenv.ClickHouse
	pg    *testenv.Postgres
	keys  map[string]string // name -> secret
	ids   map[string]string // name -> key id
	base  time.Time
	store *aggch.Store
	audit *edgepg.AuditWriter
	// reg holds the usage API's metrics.
	reg *prometheus.Registry
}

var apiMeters = []meter.Meter{
	meter.Default(),
	{Key: "bytes", EventType: "api_call", Aggregation: meter.Sum, Value: "response_bytes", GroupBy: []string{"route", "method"}},
	{Key: "users", EventType: "api_call", Aggregation: meter.UniqueCount, Value: "dimensions.user", GroupBy: []string{"route", "method"}},
}

// newAPIEnv lands a known set of events for two accounts and serves the
// usage API over them.
func newAPIEnv(t *testing.T) *apiEnv {
	t.Helper()
	ctx := context.Background()
	pg := testenv.NewPostgres(t)
	ch := testenv.NewClickHouse(t)
	keys := edgepg.NewKeyStore(pg.Pool)
	env := &apiEnv{keys: map[string]string{}, ids: map[string]string{}, ch: ch, pg: pg, reg: prometheus.NewRegistry()}
	for _, k := range []struct {
		name, account string
		kind          edge.KeyKind
		mode          schemas.Environment
		scopes        []string
	}{
		{"alpha", "acct_alpha", edge.Secret, schemas.Live, nil},
		{"alpha_pk", "acct_alpha", edge.Publishable, schemas.Live, nil},
		{"alpha_test", "acct_alpha", edge.Secret, schemas.Test, nil},
		{"beta", "acct_beta", edge.Secret, schemas.Live, nil},
		// Restricted keys: one that reports events only, one that reads
		// widgets only, one that reads usage only.
		{"alpha_events", "acct_alpha", edge.Secret, schemas.Live, []string{"events:write"}},
		{"alpha_pk_widgets", "acct_alpha", edge.Publishable, schemas.Live, []string{"widgets:read"}},
		{"alpha_usage", "acct_alpha", edge.Secret, schemas.Live, []string{"usage:read"}},
	} {
		testenv.Must(t, keys.EnsureAccount(ctx, k.account, k.account), "account")
		secret, parsed, err := edge.GenerateKey(k.kind, k.mode)
		testenv.Must(t, err, "generate key")
		id := "key_" + k.name
		testenv.Must(t, keys.CreateKey(ctx, edge.NewKey{ID: id, AccountID: k.account, Parsed: parsed, Scopes: k.scopes}), "create key")
		env.keys[k.name], env.ids[k.name] = secret, id
	}
	// Five minutes of traffic: alpha live makes i+1 calls in minute i.
	env.base = trafficStart(time.Now())
	var recs []ingest.Record
	add := func(acct, key string, mode schemas.Environment, at time.Time, route, method, user string, bytes int64) {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: acct, Environment: mode, KeyID: key,
			Type: "api_call", Time: at, Route: route, Method: method, Status: 200, ResponseBytes: bytes, Units: 1,
			Dimensions: map[string]string{"user": user}}
		e.Normalize()
		recs = append(recs, ingest.Record{Event: e})
	}
	for i := 0; i < 5; i++ {
		for j := 0; j <= i; j++ {
			add("acct_alpha", "key_alpha", schemas.Live, env.base.Add(time.Duration(i)*time.Minute+time.Duration(j)*time.Second),
				[]string{"/a", "/b"}[j%2], []string{"GET", "POST"}[i%2], fmt.Sprint("u", j%2), 100)
		}
	}
	add("acct_alpha", "key_alpha_test", schemas.Test, env.base, "/a", "GET", "u9", 7)
	for i := 0; i < 3; i++ {
		add("acct_beta", "key_beta", schemas.Live, env.base.Add(time.Duration(i)*time.Second), "/secret", "GET", "b", 1000)
	}
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, recs), "insert raw")
	late := recs[0]
	late.Event.ID, late.RecordTime, late.Value = schemas.NewEventID(), time.Now(), []byte("{}")
	late.Event.Time = env.base.Add(-40 * 24 * time.Hour)
	_, err := chsink.NewSink(ch.Conn).InsertLate(ctx, []ingest.Record{late})
	testenv.Must(t, err, "insert late")
	// A too-late copy of recs[1] that landed before its on-time copy (the
	// two in different batches): counted by that copy, so no late event.
	testenv.Must(t, ch.Conn.Exec(ctx, `INSERT INTO late_events (event_id, account_id, environment, key_id, event_type,
        timestamp, timestamp_us, units, record_time, kafka_partition, kafka_offset, payload, ingested_at)
        SELECT event_id, account_id, environment, key_id, event_type, timestamp, timestamp_us, units,
               now(), 0, 0, '{}', now() FROM usage_events WHERE event_id = ?`, recs[1].Event.ID), "insert a too-late copy of a counted event")
	env.store = aggch.NewStore(ch.Conn)
	zones := aggpg.NewZones(pg.Pool, time.Minute, slog.New(slog.DiscardHandler))
	catalog, err := aggregator.NewCatalog(apiMeters, aggpg.NewMeters(pg.Pool), time.Millisecond, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	testenv.Must(t, aggregator.NewRoller(catalog, zones, env.store, log).Landed(ctx, recs), "roll up")
	// Rolled up: the configured meters' past is counted, as an aggregator
	// records once it has rolled them up.
	stored := aggpg.NewMeters(pg.Pool)
	for _, m := range apiMeters {
		testenv.Must(t, stored.ConfigRolledUp(ctx, m), "record the configured meter")
	}
	sum := sha256.Sum256([]byte(adminToken))
	env.audit, err = edgepg.NewAuditWriter(pg.Pool, time.Hour, nil, log) // flushed by the tests that read it
	testenv.Must(t, err, "audit writer")
	t.Cleanup(func() { _ = env.audit.Close() })
	srv, err := aggregator.NewServer(aggregator.Config{AdminTokenSHA256: hex.EncodeToString(sum[:]), CORSOrigins: []string{"https://dash.example"},
		// The tests' calls come from loopback, as the dashboard's do.
		TrustedProxies: []string{"127.0.0.1"}},
		aggregator.ServerDeps{Keys: keys, Usage: env.store, Catalog: catalog, Zones: zones, Holds: aggpg.NewSpoolHolds(pg.Pool),
			PastRollups: stored, Auditor: env.audit, Registerer: env.reg, Log: log})
	testenv.Must(t, err, "server")
	env.api = srv
	srv.SetClock(func() time.Time { return time.Now().Add(time.Duration(env.ahead.Load())) })
	env.srv = httptest.NewServer(srv.Handler())
	t.Cleanup(env.srv.Close)
	return env
}

// logRow is a request log row, as the tests read it.
type logRow struct {
	Time  time.Time `json:"time"`
	Route string    `json:"route"`
	Type  string    `json:"type"`
}

// requestLog reads key's whole request log, limit rows a page (at most 20
// pages), following each page's cursor.
func (e *apiEnv) requestLog(t *testing.T, key string, limit int) []logRow {
	t.Helper()
	var rows []logRow
	path := fmt.Sprintf("/v1/requests?limit=%d", limit)
	for range 20 {
		var b struct {
			Data       []logRow `json:"data"`
			HasMore    bool     `json:"has_more"`
			NextCursor string   `json:"next_cursor"`
		}
		if st := e.get(t, path, key, &b); st != http.StatusOK {
			t.Fatalf("%s: status %d", path, st)
		}
		rows = append(rows, b.Data...)
		if !b.HasMore {
			break
		}
		path = fmt.Sprintf("/v1/requests?limit=%d&cursor=%s", limit, url.QueryEscape(b.NextCursor))
	}
	return rows
}

func (e *apiEnv) get(t *testing.T, path, key string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	return do(t, req, out)
}

func do(t *testing.T, req *http.Request, out any) int {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "request")
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: status %d, body %s: %v", req.Method, req.URL, resp.StatusCode, b, err)
		}
	}
	return resp.StatusCode
}

type usageBody struct {
	Data []struct {
		WindowStart time.Time         `json:"window_start"`
		WindowEnd   time.Time         `json:"window_end"`
		Group       map[string]string `json:"group"`
		Value       int64             `json:"value"`
	} `json:"data"`
	HasMore       bool   `json:"has_more"`
	NextCursor    string `json:"next_cursor"`
	TooLateEvents uint64 `json:"too_late_events"`
}

type errBody struct {
	Error struct {
		Type      string `json:"type"`
		Code      string `json:"code"`
		Message   string `json:"message"`
		RequestID string `json:"request_id"`
		DocURL    string `json:"doc_url"`
		Scope     string `json:"scope"`
	} `json:"error"`
}

func (e *apiEnv) usagePath(q url.Values) string {
	if q.Get("from") == "" {
		back := 40 * 24 * time.Hour // the late events are 30 days back
		if q.Get("window") == "minute" {
			back = 6 * 24 * time.Hour // minute windows are asked for over 7 days at most
		}
		q.Set("from", e.base.Add(-back).Format(time.RFC3339))
	}
	if q.Get("to") == "" {
		q.Set("to", e.base.Add(time.Hour).Format(time.RFC3339))
	}
	return "/v1/usage?" + q.Encode()
}

// trafficStart is where the test's five minutes of traffic begin: ten
// minutes before now, moved earlier when those minutes would straddle an
// hour (and so perhaps a day or a month). Split across two windows, a
// unique count is counted in both, and the totals the test expects are
// per window.
func trafficStart(now time.Time) time.Time {
	base := now.UTC().Truncate(time.Minute).Add(-10 * time.Minute)
	if next := base.Truncate(time.Hour).Add(time.Hour); base.Add(5 * time.Minute).After(next) {
		base = next.Add(-10 * time.Minute)
	}
	return base
}

func TestTrafficStartStaysInOneHour(t *testing.T) {
	for m := 0; m < 24*60; m++ {
		now := time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC).Add(time.Duration(m)*time.Minute + 17*time.Second)
		base := trafficStart(now)
		if !base.Before(now.Add(-5*time.Minute)) || base.Truncate(time.Hour) != base.Add(5*time.Minute-time.Second).Truncate(time.Hour) {
			t.Fatalf("now %s: traffic from %s", now.Format(time.TimeOnly), base.Format(time.TimeOnly))
		}
	}
}

func total(b usageBody) int64 {
	var n int64
	for _, d := range b.Data {
		n += d.Value
	}
	return n
}

func TestUsageAPI(t *testing.T) {
	e := newAPIEnv(t)
	day := url.Values{"meter": {"api_calls"}, "window": {"day"}}

	t.Run("a wrong method is a 405 naming the methods a path takes, not a 404", func(t *testing.T) {
		for _, path := range []string{"/v1/usage", "/v1/requests", "/v1/meters"} {
			edgetest.CheckOtherMethods(t, e.srv.URL+path, e.keys["alpha"], http.MethodGet)
		}
		edgetest.CheckOtherMethods(t, e.srv.URL+"/admin/v1/meters", adminToken, "GET, POST")
		edgetest.CheckOtherMethods(t, e.srv.URL+"/healthz", "", http.MethodGet)
		// The key is checked first, as on every /v1 path.
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/v1/usage", nil)
		if st := do(t, req, nil); st != http.StatusUnauthorized {
			t.Fatalf("POST /v1/usage without a key: %d, want 401", st)
		}
		// A CORS preflight is still the CORS middleware's.
		req, _ = http.NewRequest(http.MethodOptions, e.srv.URL+"/v1/usage", nil)
		req.Header.Set("Origin", "https://dash.example")
		req.Header.Set("Access-Control-Request-Method", http.MethodGet)
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "preflight")
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "https://dash.example" {
			t.Fatalf("preflight: %d, Access-Control-Allow-Origin %q", resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"))
		}
	})

	t.Run("each key reads only its own account and environment", func(t *testing.T) {
		for _, c := range []struct {
			key  string
			want int64
		}{{"alpha", 15}, {"alpha_pk", 15}, {"alpha_test", 1}, {"beta", 3}} {
			var b usageBody
			if st := e.get(t, e.usagePath(day), e.keys[c.key], &b); st != http.StatusOK {
				t.Fatalf("%s: status %d", c.key, st)
			}
			if got := total(b); got != c.want {
				t.Errorf("key %s sees %d calls, want %d", c.key, got, c.want)
			}
		}
	})
	t.Run("minute windows page with opaque cursors", func(t *testing.T) {
		q := url.Values{"meter": {"api_calls"}, "window": {"minute"}, "limit": {"2"}}
		var values []int64
		path := e.usagePath(q)
		for page := 0; ; page++ {
			var b usageBody
			if st := e.get(t, path, e.keys["alpha"], &b); st != http.StatusOK {
				t.Fatalf("page %d: status %d", page, st)
			}
			for _, d := range b.Data {
				values = append(values, d.Value)
				if d.WindowEnd.Sub(d.WindowStart) != time.Minute {
					t.Errorf("minute window %s..%s", d.WindowStart, d.WindowEnd)
				}
			}
			if !b.HasMore {
				break
			}
			q.Set("cursor", b.NextCursor)
			path = e.usagePath(q)
		}
		if fmt.Sprint(values) != "[1 2 3 4 5]" {
			t.Errorf("minute values %v, want [1 2 3 4 5]", values)
		}
	})
	t.Run("later pages of a query without a range read the first page's range", func(t *testing.T) {
		// No from or to: the range ends at the server's now. The next
		// pages are asked for seconds later and must still be accepted
		// and read the same range.
		defer e.ahead.Store(0)
		for _, c := range []struct {
			path string
			want string
		}{
			{"/v1/usage?meter=api_calls&window=minute&limit=2", "[1 2 3 4 5]"},
			{"/v1/requests?limit=1", "[/secret /secret /secret]"},
		} {
			e.ahead.Store(0)
			var got []string
			path := c.path
			for page := 0; ; page++ {
				var b struct {
					Data []struct {
						Value int64  `json:"value"`
						Route string `json:"route"`
					} `json:"data"`
					HasMore    bool   `json:"has_more"`
					NextCursor string `json:"next_cursor"`
				}
				key := e.keys["alpha"]
				if strings.HasPrefix(c.path, "/v1/requests") {
					key = e.keys["beta"]
				}
				if st := e.get(t, path, key, &b); st != http.StatusOK {
					t.Fatalf("%s page %d: status %d", c.path, page, st)
				}
				for _, d := range b.Data {
					if d.Route != "" {
						got = append(got, d.Route)
					} else {
						got = append(got, fmt.Sprint(d.Value))
					}
				}
				if !b.HasMore {
					break
				}
				e.ahead.Add(int64(3 * time.Second))
				path = c.path + "&cursor=" + url.QueryEscape(b.NextCursor)
			}
			if fmt.Sprint(got) != c.want {
				t.Errorf("%s across pages: %v, want %s", c.path, got, c.want)
			}
		}
	})
	t.Run("a cursor is refused with other parameters or another key", func(t *testing.T) {
		q := url.Values{"meter": {"api_calls"}, "window": {"minute"}, "limit": {"2"}}
		var b usageBody
		e.get(t, e.usagePath(q), e.keys["alpha"], &b)
		q.Set("cursor", b.NextCursor)
		var eb errBody
		if st := e.get(t, e.usagePath(q), e.keys["beta"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_cursor" {
			t.Errorf("beta reusing alpha's cursor: status %d code %q", st, eb.Error.Code)
		}
		// Cursors are not signed: one remade with group values no row of
		// the meter could have is refused, not passed to ClickHouse (a
		// query too large for it was a 500).
		raw, err := base64.RawURLEncoding.DecodeString(b.NextCursor)
		testenv.Must(t, err, "decode the cursor")
		var fields map[string]any
		testenv.Must(t, json.Unmarshal(raw, &fields), "decode the cursor's fields")
		for _, g := range [][]string{{strings.Repeat("x", 300_000)}, {"a", "b", "c"}} {
			fields["g"] = g
			remade, err := json.Marshal(fields)
			testenv.Must(t, err, "encode")
			q.Set("cursor", base64.RawURLEncoding.EncodeToString(remade))
			if st := e.get(t, e.usagePath(q), e.keys["alpha"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_cursor" {
				t.Errorf("cursor remade with %d group values of %d bytes: status %d code %q", len(g), len(g[0]), st, eb.Error.Code)
			}
		}
		q.Set("cursor", b.NextCursor)
		q.Set("window", "hour")
		if st := e.get(t, e.usagePath(q), e.keys["alpha"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_cursor" {
			t.Errorf("cursor with another window: status %d code %q", st, eb.Error.Code)
		}
	})
	t.Run("group_by a subset combines additive meters", func(t *testing.T) {
		var b usageBody
		q := url.Values{"meter": {"bytes"}, "window": {"day"}, "group_by": {"route"}}
		if st := e.get(t, e.usagePath(q), e.keys["alpha"], &b); st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		got := map[string]int64{}
		for _, d := range b.Data {
			got[d.Group["route"]] += d.Value
		}
		// j = 0..i over i = 0..4: 9 calls on /a and 6 on /b, 100 bytes each.
		if got["/a"] != 900 || got["/b"] != 600 || len(got) != 2 {
			t.Errorf("bytes by route %v, want /a=900 /b=600", got)
		}
	})
	t.Run("unique counts by their full group_by and in total", func(t *testing.T) {
		var b usageBody
		q := url.Values{"meter": {"users"}, "window": {"day"}}
		e.get(t, e.usagePath(q), e.keys["alpha"], &b)
		if total(b) != 2 {
			t.Errorf("distinct users %d, want 2: %+v", total(b), b.Data)
		}
		var eb errBody
		q.Set("group_by", "route")
		if st := e.get(t, e.usagePath(q), e.keys["alpha"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_group_by" {
			t.Errorf("unique count by a subset: status %d code %q", st, eb.Error.Code)
		}
		// Every dimension in another order is the same groups.
		groups := func(order string) []string {
			q.Set("group_by", order)
			var b usageBody
			if st := e.get(t, e.usagePath(q), e.keys["alpha"], &b); st != http.StatusOK {
				t.Fatalf("unique count by %s: status %d", order, st)
			}
			var out []string
			for _, d := range b.Data {
				out = append(out, fmt.Sprintf("%s %s=%d", d.Group["route"], d.Group["method"], d.Value))
			}
			slices.Sort(out)
			return out
		}
		inOrder, reordered := groups("route,method"), groups("method,route")
		if len(inOrder) != 4 || fmt.Sprint(reordered) != fmt.Sprint(inOrder) {
			t.Errorf("unique count by method,route %v; by route,method %v", reordered, inOrder)
		}
	})
	t.Run("events beyond the lateness are reported", func(t *testing.T) {
		var b usageBody
		e.get(t, e.usagePath(url.Values{"meter": {"api_calls"}}), e.keys["alpha"], &b)
		if b.TooLateEvents != 1 {
			t.Errorf("too_late_events %d, want 1", b.TooLateEvents)
		}
	})
	t.Run("bad input gets one machine-readable error shape", func(t *testing.T) {
		for _, c := range []struct {
			path, key, code string
			status          int
		}{
			{"/v1/usage", "", "missing_api_key", 401},
			{"/v1/usage", "sk_live_nonsense", "malformed_api_key", 401},
			{"/v1/usage?window=week", e.keys["alpha"], "invalid_window", 400},
			{"/v1/usage?meter=nope", e.keys["alpha"], "meter_not_found", 404},
			{"/v1/usage?from=yesterday", e.keys["alpha"], "invalid_time", 400},
			{"/v1/usage?limit=0", e.keys["alpha"], "invalid_limit", 400},
			{"/v1/usage?cursor=bm90LWEtY3Vyc29y", e.keys["alpha"], "invalid_cursor", 400},
		} {
			var eb errBody
			st := e.get(t, c.path, c.key, &eb)
			if st != c.status || eb.Error.Code != c.code || eb.Error.RequestID == "" || eb.Error.DocURL == "" || eb.Error.Type == "" {
				t.Errorf("%s: status %d, error %+v; want %d %s", c.path, st, eb.Error, c.status, c.code)
			}
		}
	})
	t.Run("fractional bounds pick the windows that start within them", func(t *testing.T) {
		q := url.Values{"meter": {"api_calls"}, "window": {"minute"},
			"from": {e.base.Add(500 * time.Millisecond).Format(time.RFC3339Nano)},
			"to":   {e.base.Add(2*time.Minute + 500*time.Millisecond).Format(time.RFC3339Nano)}}
		var b usageBody
		if st := e.get(t, e.usagePath(q), e.keys["alpha"], &b); st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		var starts []string
		for _, d := range b.Data {
			starts = append(starts, d.WindowStart.Sub(e.base).String())
		}
		if fmt.Sprint(starts) != "[1m0s 2m0s]" {
			t.Errorf("windows %v from base+0.5s to base+2m0.5s, want those starting at 1m and 2m", starts)
		}
	})
	t.Run("the request log pages past events of one id and time but two types", func(t *testing.T) {
		// Two raw rows (usage_events keys rows by type, id and time too):
		// a page that ends on the first must not skip the second.
		at := e.base.Add(90 * time.Second)
		id := schemas.NewEventID()
		var recs []ingest.Record
		for _, typ := range []string{"probe_a", "probe_b"} {
			ev := schemas.Event{Version: 1, ID: id, AccountID: "acct_alpha", Environment: schemas.Live, KeyID: "key_alpha_usage",
				Type: typ, Time: at, Units: 1}
			ev.Normalize()
			recs = append(recs, ingest.Record{Event: ev})
		}
		testenv.Must(t, chsink.NewSink(e.ch.Conn).Insert(context.Background(), recs), "insert raw")
		var types []string
		for _, d := range e.requestLog(t, e.keys["alpha_usage"], 1) {
			types = append(types, d.Type)
		}
		if fmt.Sprint(types) != "[probe_b probe_a]" {
			t.Errorf("paged one by one, the request log lists %v, want [probe_b probe_a]", types)
		}
	})
	t.Run("the request log lists the calling key's own events, newest first", func(t *testing.T) {
		var seen []string
		for _, d := range e.requestLog(t, e.keys["beta"], 4) {
			seen = append(seen, d.Route+"@"+d.Time.Sub(e.base).String())
		}
		if fmt.Sprint(seen) != "[/secret@2s /secret@1s /secret@0s]" {
			t.Errorf("beta's request log %v", seen)
		}
		// A since within a second leaves out that second's earlier events.
		var half struct {
			Data []struct {
				Time time.Time `json:"time"`
			} `json:"data"`
		}
		since := e.base.Add(500 * time.Millisecond).Format(time.RFC3339Nano)
		if st := e.get(t, "/v1/requests?since="+url.QueryEscape(since), e.keys["beta"], &half); st != http.StatusOK || len(half.Data) != 2 {
			t.Errorf("since %s: status %d, %d events, want the 2 at 1s and 2s", since, st, len(half.Data))
		}
		// A publishable key is public: its log would show every caller's
		// calls to anyone who has it.
		var eb errBody
		if st := e.get(t, "/v1/requests?limit=100", e.keys["alpha_pk"], &eb); st != http.StatusForbidden || eb.Error.Code != "secret_key_required" {
			t.Errorf("alpha's publishable key reading its request log: %d %q, want 403 secret_key_required", st, eb.Error.Code)
		}
	})
	t.Run("a request log cursor made to reach past the window is refused", func(t *testing.T) {
		var first struct {
			NextCursor string `json:"next_cursor"`
		}
		if st := e.get(t, "/v1/requests?limit=1", e.keys["beta"], &first); st != http.StatusOK || first.NextCursor == "" {
			t.Fatalf("first page: %d, cursor %q", st, first.NextCursor)
		}
		raw, err := base64.RawURLEncoding.DecodeString(first.NextCursor)
		testenv.Must(t, err, "decode the cursor")
		var c map[string]any
		testenv.Must(t, json.Unmarshal(raw, &c), "read the cursor")
		c["a"] = 1 // since 1970: the cursor is not signed, but it is bounded
		forged, _ := json.Marshal(c)
		var eb errBody
		if st := e.get(t, "/v1/requests?limit=100&cursor="+base64.RawURLEncoding.EncodeToString(forged), e.keys["beta"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_cursor" {
			t.Errorf("a cursor reaching back to 1970: %d %q, want 400 invalid_cursor", st, eb.Error.Code)
		}
		// The page's top is bounded too: past 2105 it wrapped round in
		// ClickHouse and read the key's whole history (2106), or failed
		// with a 500 (1<<62 µs); before the since, it is no page's.
		for _, top := range []float64{float64((int64(1)<<32 + 7200) * 1_000_000), float64(int64(1) << 62), 1} {
			c = map[string]any{}
			testenv.Must(t, json.Unmarshal(raw, &c), "read the cursor")
			c["t"] = top
			forged, _ := json.Marshal(c)
			var eb errBody
			if st := e.get(t, "/v1/requests?limit=100&cursor="+base64.RawURLEncoding.EncodeToString(forged), e.keys["beta"], &eb); st != http.StatusBadRequest || eb.Error.Code != "invalid_cursor" {
				t.Errorf("a cursor whose page starts at %.0f µs: %d %q, want 400 invalid_cursor", top, st, eb.Error.Code)
			}
		}
	})
	t.Run("a browser dashboard may call it cross-origin", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodOptions, e.srv.URL+"/v1/usage", nil)
		req.Header.Set("Origin", "https://dash.example")
		req.Header.Set("Access-Control-Request-Method", "GET")
		req.Header.Set("Access-Control-Request-Headers", "authorization")
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "preflight")
		resp.Body.Close()
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "https://dash.example" {
			t.Errorf("Access-Control-Allow-Origin %q", got)
		}
	})
}

func TestMetersAdminAPI(t *testing.T) {
	e := newAPIEnv(t)
	post := func(token, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/admin/v1/meters", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		var eb errBody
		st := do(t, req, &eb)
		return st, eb.Error.Code
	}
	const m = `{"key":"slow_calls","event_type":"api_call","aggregation":"COUNT","filters":[{"property":"route","in":["/a"]}]}`
	for _, c := range []struct {
		name, token, body string
		status            int
		code              string
	}{
		{"a wrong token is refused", "wrong", m, 401, "invalid_admin_token"},
		{"a new meter is created", adminToken, m, 201, ""},
		{"creating it again is idempotent", adminToken, m, 200, ""},
		{"another definition under its key conflicts", adminToken, strings.Replace(m, "/a", "/b", 1), 409, "meter_exists"},
		{"a meter of the configuration file cannot be redefined", adminToken, `{"key":"api_calls","event_type":"other","aggregation":"COUNT"}`, 409, "meter_exists"},
		{"an invalid meter is refused", adminToken, `{"key":"Bad Key","event_type":"api_call","aggregation":"MEDIAN"}`, 400, "invalid_meter"},
		{"a COUNT meter with a value is refused", adminToken, `{"key":"tokens","event_type":"api_call","aggregation":"COUNT","value":"dimensions.tokens"}`, 400, "invalid_meter"},
		{"unknown fields are refused", adminToken, `{"key":"x","surprise":1}`, 400, "invalid_json"},
		// Before, these three were 201, 500 and 400 invalid_json.
		{"text after the meter is refused", adminToken, `{"key":"trail","event_type":"api_call","aggregation":"COUNT"} garbage`, 400, "invalid_json"},
		{"a brace after the meter is refused", adminToken, `{"key":"trail2","event_type":"api_call","aggregation":"COUNT"}}`, 400, "invalid_json"},
		{"text past 64 KiB after the meter is too large", adminToken, `{"key":"trail3","event_type":"api_call","aggregation":"COUNT"}` + strings.Repeat(" ", 70<<10) + `garbage`, 413, "payload_too_large"},
		{"a filter value Postgres cannot store is refused", adminToken, `{"key":"nul","event_type":"api_call","aggregation":"COUNT","filters":[{"property":"route","in":["a\u0000b"]}]}`, 400, "invalid_meter"},
		{"a body over 64 KiB is too large", adminToken, `{"key":"big","event_type":"api_call","aggregation":"COUNT","filters":[{"property":"route","in":["` + strings.Repeat("a", 70<<10) + `"]}]}`, 413, "payload_too_large"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if st, code := post(c.token, c.body); st != c.status || code != c.code {
				t.Errorf("status %d code %q, want %d %q", st, code, c.status, c.code)
			}
		})
	}
	t.Run("the scheme's case does not matter", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/admin/v1/meters", nil)
		req.Header.Set("Authorization", "bearer "+adminToken)
		if st := do(t, req, nil); st != 200 {
			t.Errorf("lower-case bearer: %d, want 200", st)
		}
	})
	t.Run("the new meter is listed and queryable", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/admin/v1/meters", nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		var list struct{ Data []meter.Meter }
		do(t, req, &list)
		var keys []string
		for _, m := range list.Data {
			keys = append(keys, m.Key)
		}
		if fmt.Sprint(keys) != "[api_calls bytes slow_calls users]" {
			t.Errorf("meters %v", keys)
		}
		var b usageBody
		if st := e.get(t, e.usagePath(url.Values{"meter": {"slow_calls"}}), e.keys["alpha"], &b); st != http.StatusOK {
			t.Errorf("query new meter: status %d", st)
		}
	})
	// Failed admin logins are in the audit log, as the edge admin API's
	// are: this API is on the usage API's port, which browsers reach.
	t.Run("a failed admin login is audited", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/admin/v1/meters", nil)
		if st := do(t, req, nil); st != http.StatusUnauthorized {
			t.Fatalf("no token: status %d", st)
		}
		ctx := context.Background()
		e.audit.Flush(ctx)
		reasons := e.pg.Strings(t, `SELECT reason FROM audit_log WHERE action = $1 AND actor = 'meters_admin' ORDER BY reason`,
			edge.ActionAdminAuth)
		if fmt.Sprint(reasons) != "[no admin token wrong admin token]" {
			t.Errorf("audited %q, want the missing and the wrong token", reasons)
		}
	})
}

// A meter stored by an older version under a looser rule (here a filter
// over the bound on filter values) is left out of the catalog and listed as
// refused with its reason; every other meter keeps rolling up and serving.
func TestAStoredMeterThisVersionRefusesIsLeftOut(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	routes := make([]string, 2000)
	for i := range routes {
		routes[i] = fmt.Sprintf("/v1/route/%04d", i)
	}
	old := meter.Meter{Key: "many_routes", EventType: "api_call", Aggregation: meter.Count,
		Filters: []meter.Filter{{Property: "route", Values: routes}}}
	if old.Validate() == nil {
		t.Fatal("the old meter passes this version's rules; the test needs one it refuses")
	}
	def, err := json.Marshal(old)
	testenv.Must(t, err, "marshal")
	_, err = e.pg.Pool.Exec(ctx, "INSERT INTO meters (key, definition) VALUES ($1, $2)", old.Key, def)
	testenv.Must(t, err, "store the old meter as an older version would have")

	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/admin/v1/meters", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	var list struct {
		Data    []meter.Meter
		Refused []aggregator.RefusedMeter
	}
	if st := do(t, req, &list); st != http.StatusOK {
		t.Fatalf("admin list: status %d with a refused meter stored", st)
	}
	var keys []string
	for _, m := range list.Data {
		keys = append(keys, m.Key)
	}
	if fmt.Sprint(keys) != "[api_calls bytes users]" {
		t.Errorf("meters in force %v, want the configured ones only", keys)
	}
	if len(list.Refused) != 1 || list.Refused[0].Key != "many_routes" || !strings.Contains(list.Refused[0].Reason, "bytes of values") {
		t.Errorf("refused %+v, want many_routes with the filter bound as its reason", list.Refused)
	}
	var b usageBody
	if st := e.get(t, e.usagePath(url.Values{"meter": {"api_calls"}}), e.keys["alpha"], &b); st != http.StatusOK || len(b.Data) == 0 {
		t.Errorf("another meter's usage: status %d, %d rows", st, len(b.Data))
	}
	var eb errBody
	if st := e.get(t, e.usagePath(url.Values{"meter": {"many_routes"}}), e.keys["alpha"], &eb); st != http.StatusNotFound {
		t.Errorf("the refused meter's usage: status %d %q, want 404", st, eb.Error.Code)
	}
}

// countingUsage passes every call to the real store and counts the status
// queries.
type countingUsage struct {
	aggregator.UsageStore
	tooLate, complete atomic.Int32
}

func (c *countingUsage) TooLate(ctx context.Context, account, env string, from, to time.Time) (uint64, error) {
	c.tooLate.Add(1)
	return c.UsageStore.TooLate(ctx, account, env, from, to)
}

func (c *countingUsage) CompleteThrough(ctx context.Context) (time.Time, bool, error) {
	c.complete.Add(1)
	return c.UsageStore.CompleteThrough(ctx)
}

func TestPollingTheUsageAPIDoesNotRepeatTheStatusQueries(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	counting := &countingUsage{UsageStore: e.store}
	pg := testenv.NewPostgres(t)
	keys := edgepg.NewKeyStore(pg.Pool)
	testenv.Must(t, keys.EnsureAccount(ctx, "acct_beta", "acct_beta"), "account")
	secret, parsed, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate key")
	testenv.Must(t, keys.CreateKey(ctx, edge.NewKey{ID: "key_beta_poll", AccountID: "acct_beta", Parsed: parsed}), "create key")
	catalog, err := aggregator.NewCatalog(apiMeters, aggpg.NewMeters(pg.Pool), time.Minute, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	srv, err := aggregator.NewServer(aggregator.Config{}, aggregator.ServerDeps{Keys: keys, Usage: counting, Catalog: catalog,
		Zones: aggpg.NewZones(pg.Pool, time.Minute, slog.New(slog.DiscardHandler)), Holds: aggpg.NewSpoolHolds(pg.Pool)})
	testenv.Must(t, err, "server")
	// A clock that stands still until the test moves it: "within a second"
	// must not depend on how fast the machine answers five polls.
	var ahead atomic.Int64
	start := time.Now()
	srv.SetClock(func() time.Time { return start.Add(time.Duration(ahead.Load())) })
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	poll := func() usageBody {
		t.Helper()
		var b usageBody
		req, _ := http.NewRequest(http.MethodGet, hs.URL+e.usagePath(url.Values{"window": {"hour"}}), nil)
		req.Header.Set("Authorization", "Bearer "+secret)
		if st := do(t, req, &b); st != http.StatusOK {
			t.Fatalf("status %d", st)
		}
		return b
	}

	// Within a second: one watermark query and one late-event count for
	// however many polls; beta has no late events.
	for range 5 {
		if b := poll(); b.TooLateEvents != 0 || total(b) != 3 {
			t.Fatalf("beta: %d calls, %d too late; want 3 and 0", total(b), b.TooLateEvents)
		}
	}
	if n, m := counting.tooLate.Load(), counting.complete.Load(); n != 1 || m != 1 {
		t.Fatalf("5 polls in a second: %d late-event and %d watermark queries, want 1 and 1", n, m)
	}

	// A too-late event for beta shows within a second.
	late := ingest.Record{Event: schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_beta", Environment: schemas.Live,
		KeyID: "key_beta", Type: "api_call", Time: e.base.Add(-39 * 24 * time.Hour), Units: 1}, RecordTime: time.Now(), Value: []byte("{}")}
	_, err = chsink.NewSink(e.ch.Conn).InsertLate(ctx, []ingest.Record{late})
	testenv.Must(t, err, "insert late")
	ahead.Store(int64(1100 * time.Millisecond))
	if b := poll(); b.TooLateEvents != 1 {
		t.Fatalf("a second after a too-late event: %d reported, want 1", b.TooLateEvents)
	}
	if n, m := counting.tooLate.Load(), counting.complete.Load(); n != 3 || m != 2 {
		t.Fatalf("after a second: %d late-event and %d watermark queries, want 3 (all time, then the range) and 2", n, m)
	}
}

// A page starts after the last row of the page before, so a group that
// lands between two pages, sorting before the boundary, neither repeats a
// row on the next page nor pushes one off it.
func TestUsagePagesHoldWhileRowsLand(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	q := url.Values{"meter": {"bytes"}, "window": {"day"}, "group_by": {"route,method"}, "limit": {"2"}}
	var first usageBody
	if st := e.get(t, e.usagePath(q), e.keys["alpha"], &first); st != http.StatusOK || !first.HasMore || len(first.Data) != 2 {
		t.Fatalf("first page: status %d, %d rows, has_more %v", st, len(first.Data), first.HasMore)
	}
	ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_alpha", Environment: schemas.Live,
		KeyID: "key_alpha", Type: "api_call", Time: e.base, Route: "/0", Method: "GET", Status: 200, ResponseBytes: 5, Units: 1}
	ev.Normalize()
	recs := []ingest.Record{{Event: ev}}
	testenv.Must(t, chsink.NewSink(e.ch.Conn).Insert(ctx, recs), "insert raw")
	roller := aggregator.NewRoller(aggregator.StaticMeters(apiMeters), aggregator.StaticZones{}, e.store, slog.New(slog.DiscardHandler))
	testenv.Must(t, roller.Landed(ctx, recs), "roll up")

	seen := map[string]int{}
	for _, d := range first.Data {
		seen[d.Group["route"]+" "+d.Group["method"]]++
	}
	q.Set("cursor", first.NextCursor)
	for path := e.usagePath(q); ; {
		var b usageBody
		if st := e.get(t, path, e.keys["alpha"], &b); st != http.StatusOK {
			t.Fatalf("next page: status %d", st)
		}
		for _, d := range b.Data {
			seen[d.Group["route"]+" "+d.Group["method"]]++
		}
		if !b.HasMore {
			break
		}
		q.Set("cursor", b.NextCursor)
		path = e.usagePath(q)
	}
	want := map[string]int{"/a GET": 1, "/a POST": 1, "/b GET": 1, "/b POST": 1}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("rows over the pages %v, want each of the first page's query once: %v", seen, want)
	}
}

// Times ClickHouse cannot hold, and ranges too long for the window, are
// refused; before, a time past 2105 wrapped around in ClickHouse 18.16 and
// gave an empty answer, or the request log's whole history.
func TestUsageRefusesTimesAndRangesItCannotServe(t *testing.T) {
	e := newAPIEnv(t)
	for _, c := range []struct {
		name, path, code string
	}{
		{"a to past 2105", "/v1/usage?meter=api_calls&window=day&from=2026-01-01T00:00:00Z&to=2106-01-01T00:00:00Z", "invalid_time"},
		{"a from before 1970", "/v1/usage?meter=api_calls&window=month&from=1969-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "invalid_time"},
		{"a since past 2105", "/v1/requests?since=2200-01-01T00:00:00Z", "invalid_time"},
		{"a since before the request log's window (it would read the key's whole history)", "/v1/requests?since=1970-01-01T00:00:00Z", "invalid_time"},
		{"minute windows over more than 7 days", "/v1/usage?meter=api_calls&window=minute&from=2026-01-01T00:00:00Z&to=2026-01-08T00:00:01Z", "invalid_time_range"},
		{"hour windows over more than 93 days", "/v1/usage?meter=api_calls&window=hour&from=2026-01-01T00:00:00Z&to=2026-06-01T00:00:00Z", "invalid_time_range"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var eb errBody
			if st := e.get(t, c.path, e.keys["alpha"], &eb); st != http.StatusBadRequest || eb.Error.Code != c.code {
				t.Errorf("status %d code %q, want 400 %s", st, eb.Error.Code, c.code)
			}
		})
	}
}

// Reading usage takes the usage:read scope: keys created without scopes
// have it (a publishable one too, for dashboards in browsers), a key
// restricted to other scopes does not. The key may come as basic auth's
// user name, as the edge takes it.
func TestUsageTakesTheUsageReadScope(t *testing.T) {
	e := newAPIEnv(t)
	for _, c := range []struct {
		key    string
		status int
	}{
		{"alpha", 200}, {"alpha_pk", 200}, {"alpha_usage", 200},
		{"alpha_events", 403}, {"alpha_pk_widgets", 403},
	} {
		var eb errBody
		st := e.get(t, "/v1/usage?meter=api_calls&window=day", e.keys[c.key], &eb)
		if st != c.status || (st == 403 && (eb.Error.Code != "insufficient_scope" || eb.Error.Scope != "usage:read")) {
			t.Errorf("%s: %d %+v, want %d", c.key, st, eb.Error, c.status)
		}
	}
	noKey, err := http.Get(e.srv.URL + "/v1/usage?meter=api_calls&window=day")
	testenv.Must(t, err, "call without a key")
	noKey.Body.Close()
	if noKey.StatusCode != 401 || noKey.Header.Get("WWW-Authenticate") != edge.WWWAuthenticate {
		t.Errorf("no key: %d, WWW-Authenticate %q; want 401 with %q", noKey.StatusCode, noKey.Header.Get("WWW-Authenticate"), edge.WWWAuthenticate)
	}
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/v1/usage?meter=api_calls&window=day", nil)
	req.SetBasicAuth(e.keys["alpha"], "")
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "call with basic auth")
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("the key as basic auth's user name: %d, want 200", resp.StatusCode)
	}
}

// complete_through is the invoicer's gate: the landed watermark capped by
// the edges' spool holds, which the usage API reads and never retires.
func TestCompleteThroughWaitsForSpoolHolds(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	wm := time.Now().UTC().Truncate(time.Second)
	testenv.Must(t, e.ch.Conn.Exec(ctx, fmt.Sprintf(
		"INSERT INTO watermarks (partition, watermark, updated_at) SELECT 0, toDateTime(%d, 'UTC'), now()", wm.Unix())), "watermark")
	since := wm.Add(-2 * time.Hour)
	completeThrough := func() time.Time {
		t.Helper()
		e.ahead.Add(int64(1100 * time.Millisecond)) // past the status cache
		var b struct {
			CompleteThrough *time.Time `json:"complete_through"`
		}
		if st := e.get(t, "/v1/usage?window=hour", e.keys["alpha"], &b); st != http.StatusOK || b.CompleteThrough == nil {
			t.Fatalf("status %d, complete_through %v; want 200 with complete_through", st, b.CompleteThrough)
		}
		return b.CompleteThrough.UTC()
	}
	hold := func(sql string, args ...any) {
		t.Helper()
		_, err := e.pg.Pool.Exec(ctx, sql, args...)
		testenv.Must(t, err, "spool hold")
	}

	for _, c := range []struct {
		name string
		sql  string
		args []any
		want time.Time
	}{
		{"without holds it is the watermark", "DELETE FROM edge_spool_holds", nil, wm},
		{"a hold not released caps it at the hold",
			"INSERT INTO edge_spool_holds (instance, since) VALUES ('edge-1', $1)", []any{since}, since},
		{"a hold released after the watermark still caps it",
			"UPDATE edge_spool_holds SET released_at = $1", []any{wm.Add(time.Minute)}, since},
		{"a hold released before the watermark no longer caps it",
			"UPDATE edge_spool_holds SET released_at = $1", []any{wm.Add(-time.Minute)}, wm},
		{"a second edge's hold caps it at the earlier of the two",
			"INSERT INTO edge_spool_holds (instance, since) VALUES ('edge-2', $1)", []any{since.Add(30 * time.Minute)}, since.Add(30 * time.Minute)},
		{"a hold later than the watermark does not move it",
			"UPDATE edge_spool_holds SET since = $1, released_at = NULL WHERE instance = 'edge-2'", []any{wm.Add(time.Hour)}, wm},
		{"a retired hold does not cap it", "DELETE FROM edge_spool_holds WHERE instance = 'edge-2'", nil, wm},
	} {
		t.Run(c.name, func(t *testing.T) {
			hold(c.sql, c.args...)
			if got := completeThrough(); !got.Equal(c.want) {
				t.Fatalf("complete_through %s, want %s", got.Format(time.RFC3339), c.want.Format(time.RFC3339))
			}
		})
	}
	// Reading the holds leaves them in place: retiring a released one is
	// the invoicer's.
	var n int
	testenv.Must(t, e.pg.Pool.QueryRow(ctx, "SELECT count(*) FROM edge_spool_holds WHERE instance = 'edge-1'").Scan(&n), "count holds")
	if n != 1 {
		t.Fatalf("%d rows for edge-1's released hold after the usage API read it, want 1", n)
	}
}

// While a meter's past is still being rolled up its windows may read empty
// or short: the usage response says so and leaves complete_through out,
// for a meter created through the admin API until its backfill is recorded
// finished, and for a configured meter that is new or changed until its
// roll-up is recorded.
func TestAMeterStillBackfillingSaysSo(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	stored := aggpg.NewMeters(e.pg.Pool)
	testenv.Must(t, e.ch.Conn.Exec(ctx, fmt.Sprintf(
		"INSERT INTO watermarks (partition, watermark, updated_at) SELECT 0, toDateTime(%d, 'UTC'), now()", time.Now().Unix())), "watermark")
	type body struct {
		CompleteThrough *time.Time `json:"complete_through"`
		Backfilling     *bool      `json:"backfilling"`
	}
	check := func(t *testing.T, meterKey string, backfilling bool) {
		t.Helper()
		e.ahead.Add(int64(1100 * time.Millisecond)) // past the status cache
		var b body
		if st := e.get(t, "/v1/usage?window=hour&meter="+meterKey, e.keys["alpha"], &b); st != http.StatusOK {
			t.Fatalf("usage of %s: status %d", meterKey, st)
		}
		switch {
		case backfilling && (b.Backfilling == nil || !*b.Backfilling || b.CompleteThrough != nil):
			t.Fatalf("%s: backfilling %v, complete_through %v; want backfilling true and no complete_through", meterKey, b.Backfilling, b.CompleteThrough)
		case !backfilling && (b.Backfilling != nil || b.CompleteThrough == nil):
			t.Fatalf("%s: backfilling %v, complete_through %v; want no backfilling and a complete_through", meterKey, b.Backfilling, b.CompleteThrough)
		}
	}

	t.Run("a configured meter that is rolled up", func(t *testing.T) { check(t, "bytes", false) })
	t.Run("a configured meter not yet rolled up", func(t *testing.T) {
		_, err := e.pg.Pool.Exec(ctx, "DELETE FROM config_meters WHERE key = 'bytes'")
		testenv.Must(t, err, "forget the roll-up")
		check(t, "bytes", true)
		check(t, "api_calls", false)
		testenv.Must(t, stored.ConfigRolledUp(ctx, apiMeters[1]), "record the roll-up")
		check(t, "bytes", false)
	})
	t.Run("a configured meter rolled up under another definition", func(t *testing.T) {
		old := apiMeters[1]
		old.GroupBy = []string{"route"}
		testenv.Must(t, stored.ConfigRolledUp(ctx, old), "record another definition")
		check(t, "bytes", true)
		testenv.Must(t, stored.ConfigRolledUp(ctx, apiMeters[1]), "record the roll-up")
		check(t, "bytes", false)
	})
	t.Run("an admin-API meter until its backfill is recorded finished", func(t *testing.T) {
		m := meter.Meter{Key: "posts", EventType: "api_call", Aggregation: meter.Count,
			Filters: []meter.Filter{{Property: "method", Values: []string{"POST"}}}}
		b, err := json.Marshal(m)
		testenv.Must(t, err, "encode meter")
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/admin/v1/meters", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+adminToken)
		req.Header.Set("Content-Type", "application/json")
		if st := do(t, req, nil); st != http.StatusCreated {
			t.Fatalf("create meter: status %d", st)
		}
		check(t, "posts", true)
		claim := uuid.New()
		if ok, err := stored.ClaimBackfill(ctx, m, claim); err != nil || !ok {
			t.Fatalf("claim the backfill: %v, %v", ok, err)
		}
		check(t, "posts", true)
		if ok, err := stored.Backfilled(ctx, m.Key, claim); err != nil || !ok {
			t.Fatalf("record the backfill: %v, %v", ok, err)
		}
		check(t, "posts", false)
	})
}

// A key the usage API refuses is audited as the edge audits its own:
// missing, malformed, unknown and revoked keys each leave an auth.failed
// row naming the usage API, with at most a display prefix.
func TestTheUsageAPIAuditsFailedAuthentications(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	keys := edgepg.NewKeyStore(e.pg.Pool)
	_, err := keys.RevokeKey(ctx, e.ids["beta"], time.Now(), edge.AuditInfo{Actor: "test"})
	testenv.Must(t, err, "revoke")
	unknown, _, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate")
	for _, key := range []string{"", "hunter2", unknown, e.keys["beta"]} {
		if st := e.get(t, "/v1/usage?window=hour", key, nil); st != http.StatusUnauthorized {
			t.Fatalf("key %.12q: status %d, want 401", key, st)
		}
	}
	// Through a trusted proxy (the dashboard), the row names the caller
	// it forwarded for; the usage API's meters admin too.
	for _, c := range []struct{ path, auth, forwardedFor string }{
		{"/v1/usage?window=hour", "Bearer " + unknown, "6.6.6.6, 203.0.113.8"},
		{"/admin/v1/meters", "Bearer wrong", "203.0.113.9"},
	} {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+c.path, nil)
		req.Header.Set("Authorization", c.auth)
		req.Header.Set("X-Forwarded-For", c.forwardedFor)
		if st := do(t, req, nil); st != http.StatusUnauthorized {
			t.Fatalf("%s through a proxy: status %d, want 401", c.path, st)
		}
	}
	e.audit.Flush(ctx)
	forwarded := e.pg.Strings(t, `SELECT actor || ' ' || remote_addr FROM audit_log WHERE remote_addr LIKE '203.0.113.%' ORDER BY 1`)
	if fmt.Sprint(forwarded) != "[meters_admin 203.0.113.9 usage_api 203.0.113.8]" {
		t.Fatalf("rows of calls through a trusted proxy name %q, want the callers it forwarded for", forwarded)
	}
	rows, err := e.pg.Pool.Query(ctx, `SELECT reason, coalesce(key_prefix, '') FROM audit_log
		WHERE action = $1 AND actor = 'usage_api' AND remote_addr NOT LIKE '203.0.113.%' ORDER BY reason`, edge.ActionAuthFailed)
	testenv.Must(t, err, "read the audit log")
	var got []string
	for rows.Next() {
		var reason, prefix string
		testenv.Must(t, rows.Scan(&reason, &prefix), "scan")
		got = append(got, reason+" "+prefix)
	}
	want := []string{"malformed ", "missing ", "revoked " + e.keys["beta"][:12], "unknown " + unknown[:12]}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("audit rows %q, want %q", got, want)
	}
}

// An account's usage is kept by no cache between the API and its caller,
// the browser's on-disk one above all.
func TestUsageAnswersAreNotStored(t *testing.T) {
	e := newAPIEnv(t)
	for _, path := range []string{"/v1/usage?meter=api_calls&window=day", "/v1/requests", "/v1/meters"} {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+e.keys["alpha"])
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "GET "+path)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Cache-Control") != "no-store" {
			t.Errorf("GET %s: %d, Cache-Control %q; want 200, no-store", path, resp.StatusCode, resp.Header.Get("Cache-Control"))
		}
	}
}

// orderedUsage and orderedRezones note the order the usage API asks them in.
type orderedUsage struct {
	aggregator.UsageStore
	calls *[]string
}

func (o orderedUsage) Usage(ctx context.Context, q aggregator.UsageQuery) ([]aggregator.UsageRow, error) {
	*o.calls = append(*o.calls, "rows")
	return o.UsageStore.Usage(ctx, q)
}

type orderedRezones struct {
	calls *[]string
	owed  map[string]bool
}

func (o orderedRezones) Rezoning(context.Context) (map[string]bool, error) {
	*o.calls = append(*o.calls, "rezoning")
	return o.owed, nil
}

// Whether an account's coarser windows are being re-rolled onto its new
// zone is read before the rows: read after, a rezone could delete rows
// under the read and finish before the answer was made, which then had
// rows missing and said nothing. Minute windows do not move with a zone.
func TestRezoningIsReadBeforeTheRows(t *testing.T) {
	e := newAPIEnv(t)
	var calls []string
	catalog, err := aggregator.NewCatalog(apiMeters, aggpg.NewMeters(e.pg.Pool), time.Minute, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	srv, err := aggregator.NewServer(aggregator.Config{}, aggregator.ServerDeps{Keys: edgepg.NewKeyStore(e.pg.Pool),
		Usage: orderedUsage{UsageStore: e.store, calls: &calls}, Catalog: catalog,
		Zones: aggpg.NewZones(e.pg.Pool, time.Minute, slog.New(slog.DiscardHandler)), Holds: aggpg.NewSpoolHolds(e.pg.Pool),
		Rezones: orderedRezones{calls: &calls, owed: map[string]bool{"acct_alpha": true}}})
	testenv.Must(t, err, "server")
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	read := func(window string) map[string]any {
		t.Helper()
		calls = nil
		var b map[string]any
		req, _ := http.NewRequest(http.MethodGet, hs.URL+e.usagePath(url.Values{"window": {window}}), nil)
		req.Header.Set("Authorization", "Bearer "+e.keys["alpha"])
		if st := do(t, req, &b); st != http.StatusOK {
			t.Fatalf("%s: status %d", window, st)
		}
		return b
	}
	b := read("hour")
	if !slices.Equal(calls, []string{"rezoning", "rows"}) {
		t.Fatalf("an hour answer asked %v, want whether the account is rezoning before its rows", calls)
	}
	if b["rezoning"] != true || b["complete_through"] != nil {
		t.Fatalf("an hour answer of an account owed a rezone: rezoning %v, complete_through %v; want true and none", b["rezoning"], b["complete_through"])
	}
	if b := read("minute"); b["rezoning"] != nil || slices.Contains(calls, "rezoning") {
		t.Fatalf("a minute answer: rezoning %v, asked %v; minute windows do not move with a zone", b["rezoning"], calls)
	}
}

// The usage API counts every answer by route, method and status, the
// refusals its error handler writes included, and a path it does not serve
// under "other", so that no caller can grow the label sets.
func TestTheUsageAPICountsItsAnswers(t *testing.T) {
	e := newAPIEnv(t)
	q := url.Values{"meter": {"api_calls"}, "window": {"minute"}, "from": {e.base.Format(time.RFC3339)}, "to": {e.base.Add(10 * time.Minute).Format(time.RFC3339)}}
	var body usageBody
	if st := e.get(t, e.usagePath(q), e.keys["alpha"], &body); st != http.StatusOK {
		t.Fatalf("usage: %d", st)
	}
	if st := e.get(t, e.usagePath(q), "", nil); st != http.StatusUnauthorized {
		t.Fatalf("usage without a key: %d", st)
	}
	for i := 0; i < 2; i++ {
		if st := e.get(t, fmt.Sprintf("/v1/nothing-%d", i), e.keys["alpha"], nil); st != http.StatusNotFound {
			t.Fatalf("an unknown path: %d", st)
		}
	}
	req, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/v1/usage", nil)
	req.Header.Set("Authorization", "Bearer "+e.keys["alpha"])
	if st := do(t, req, nil); st != http.StatusMethodNotAllowed {
		t.Fatalf("DELETE /v1/usage: %d", st)
	}
	want := `
# HELP tollgate_usage_api_requests_total Usage API answers by route (the pattern; other for any path it does not serve), method and status code.
# TYPE tollgate_usage_api_requests_total counter
tollgate_usage_api_requests_total{code="200",method="GET",route="/v1/usage"} 1
tollgate_usage_api_requests_total{code="401",method="GET",route="/v1/usage"} 1
tollgate_usage_api_requests_total{code="404",method="GET",route="other"} 2
tollgate_usage_api_requests_total{code="405",method="other",route="/v1/usage"} 1
`
	if err := testutil.GatherAndCompare(e.reg, strings.NewReader(want), "tollgate_usage_api_requests_total"); err != nil {
		t.Error(err)
	}
	mfs, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	var usageAnswers uint64
	for _, mf := range mfs {
		if mf.GetName() != "tollgate_usage_api_request_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "route" && l.GetValue() == "/v1/usage" {
					usageAnswers += m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	if usageAnswers != 3 {
		t.Errorf("the duration histogram holds %d answers of /v1/usage, want 3", usageAnswers)
	}
}

// A second server on one metrics registry is refused with an error, as
// every other component's constructor refuses it. Before, the registry's
// duplicate registration panicked and took the process with it.
func TestASecondUsageAPIOnOneRegistryIsAnErrorNotAPanic(t *testing.T) {
	catalog, err := aggregator.NewCatalog(apiMeters, nil, time.Minute, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	reg := prometheus.NewRegistry()
	deps := aggregator.ServerDeps{Catalog: catalog, Registerer: reg, Log: slog.New(slog.DiscardHandler)}
	_, err = aggregator.NewServer(aggregator.Config{}, deps)
	testenv.Must(t, err, "the first server")
	if _, err := aggregator.NewServer(aggregator.Config{}, deps); err == nil || !strings.Contains(err.Error(), "register usage API metrics") {
		t.Fatalf("a second server on the registry: %v, want an error", err)
	}
}
