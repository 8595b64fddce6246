package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/demo"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// pipeline is the real edge and ingest, started in-process on port 0
// against this test's own database, ClickHouse database and topic.
type pipeline struct {
	cfg      Config
	ch       *testenv.ClickHouse
	pg       *testenv.Postgres
	edgeURL  string
	upstream *demo.Upstream
}

// isolatedConfig is the default configuration pointed at this test's own
// Postgres and ClickHouse databases and Kafka topics, every listener on a
// free loopback port.
func isolatedConfig(t *testing.T) (Config, *testenv.Postgres, *testenv.ClickHouse) {
	t.Helper()
	pg := testenv.NewPostgres(t)
	ch := testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 4)
	testenv.CreateTopic(t, topic+".dlq", 4) // dead letters keep their source partition number
	cfg, err := LoadConfig("")
	testenv.Must(t, err, "load config")
	cfg.Services.PostgresURL = pg.URL
	cfg.Services.ClickHouseAddr = ch.Addr
	cfg.Services.ClickHouseDatabase = ch.Database
	cfg.Services.KafkaBrokers = testenv.KafkaBrokers()
	cfg.Edge.Listen = "127.0.0.1:0"
	cfg.Aggregator.Listen = "127.0.0.1:0"
	cfg.Invoicer.Listen = "127.0.0.1:0"
	cfg.Dashboard.Listen = "127.0.0.1:0"
	cfg.Edge.SpoolDir = t.TempDir()
	// Its own Redis key space: the demo's accounts have the same names in
	// every run, and two runs at once shared their rate-limit buckets.
	cfg.Edge.RateLimitPrefix = testenv.NewRedis(t).Prefix
	cfg.Ingest.Topic = topic
	cfg.Ingest.DeadLetter = topic + ".dlq"
	cfg.Ingest.Group = topic + ".ingest"
	return cfg, pg, ch
}

func startPipeline(t *testing.T) *pipeline {
	t.Helper()
	cfg, pg, ch := isolatedConfig(t)
	up := &demo.Upstream{}
	upSrv := httptest.NewServer(up)
	t.Cleanup(upSrv.Close)
	cfg.Edge.Upstream = upSrv.URL
	cfg.Ingest.BatchWait = 50 * time.Millisecond
	testenv.Must(t, cfg.Validate(), "validate config")

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comps, err := allComponents(ctx, cfg, log)
	testenv.Must(t, err, "start components")
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runComponents(runCtx, log, comps) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("pipeline stopped with: %v", err)
		}
	})
	var edgeAddr string
	for _, n := range comps {
		if m, ok := n.c.(*EdgeMain); ok {
			edgeAddr = m.Addr()
		}
	}
	return &pipeline{cfg: cfg, ch: ch, pg: pg, edgeURL: "http://" + edgeAddr, upstream: up}
}

func (p *pipeline) newKey(t *testing.T, account string, env schemas.Environment) (secret, keyID string) {
	t.Helper()
	ctx := context.Background()
	store := edgepg.NewKeyStore(p.pg.Pool)
	testenv.Must(t, store.EnsureAccount(ctx, account, account), "ensure account")
	// The free tier allows 5 calls a second; these tests send more.
	testenv.Must(t, store.EnsureSubscription(ctx, account, "growth"), "subscribe")
	secret, parsed, err := edge.GenerateKey(edge.Secret, env)
	testenv.Must(t, err, "generate key")
	keyID = "key_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:16]
	testenv.Must(t, store.CreateKey(ctx, edgepg.NewKey{ID: keyID, AccountID: account, Parsed: parsed}), "create key")
	return secret, keyID
}

// call sends GET path to the edge with key and returns the status.
func (p *pipeline) call(t *testing.T, key, path string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", p.edgeURL+path, nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "call the edge")
	resp.Body.Close()
	return resp.StatusCode
}

type rawRow struct {
	EventID       uuid.UUID
	Account       string
	Env           string
	KeyID         string
	Type          string
	Route         string
	Method        string
	Status        uint16
	RequestBytes  uint64
	ResponseBytes uint64
	Units         int64
	RequestID     string
	TimestampUS   uint64
	Timestamp     time.Time
}

func TestEndToEndEveryCallLandsOnceFieldByField(t *testing.T) {
	p := startPipeline(t)
	liveKey, liveID := p.newKey(t, "acct_e2e", schemas.Live)
	testKey, testID := p.newKey(t, "acct_e2e", schemas.Test)

	const n = 200
	type sent struct {
		method, path, key, keyID, env string
		status                        int
		reqBytes                      int
		respBytes                     int
		at                            time.Time
	}
	byReqID := map[string]sent{}
	client := &http.Client{Timeout: 10 * time.Second}
	for i := 0; i < n; i++ {
		s := sent{method: "GET", path: fmt.Sprintf("/v1/items/%d", i), key: liveKey, keyID: liveID, env: "live"}
		var body io.Reader
		if i%3 == 0 {
			s.method = "POST"
			payload := strings.Repeat("x", i)
			s.reqBytes = len(payload)
			body = strings.NewReader(payload)
		}
		if i%5 == 0 {
			s.key, s.keyID, s.env = testKey, testID, "test"
		}
		req, err := http.NewRequest(s.method, p.edgeURL+s.path+"?q="+fmt.Sprint(i), body)
		testenv.Must(t, err, "new request")
		req.Header.Set("Authorization", "Bearer "+s.key)
		s.at = time.Now()
		resp, err := client.Do(req)
		testenv.Must(t, err, "call edge")
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("call %d: status %d: %s", i, resp.StatusCode, b)
		}
		var echo demo.Echo
		testenv.Must(t, json.Unmarshal(b, &echo), "decode upstream echo")
		if echo.Path != s.path || echo.Method != s.method || echo.Query != fmt.Sprintf("q=%d", i) {
			t.Fatalf("call %d: upstream saw %s %s?%s", i, echo.Method, echo.Path, echo.Query)
		}
		if _, leaked := echo.Headers["Authorization"]; leaked {
			t.Fatalf("call %d: the API key reached the upstream", i)
		}
		s.status, s.respBytes = resp.StatusCode, len(b)
		rid := resp.Header.Get(edge.HeaderRequestID)
		if rid == "" {
			t.Fatalf("call %d: no %s header", i, edge.HeaderRequestID)
		}
		byReqID[rid] = s
	}

	ctx := context.Background()
	var count uint64
	testenv.Wait(t, 60*time.Second, fmt.Sprintf("%d events in ClickHouse", n), func() bool {
		err := p.ch.Conn.QueryRow(ctx, "SELECT count() FROM usage_events FINAL").Scan(&count)
		return err == nil && count >= n
	})
	// Give a straggler duplicate the chance to show up before counting exactly.
	time.Sleep(500 * time.Millisecond)
	testenv.Must(t, p.ch.Conn.QueryRow(ctx, "SELECT count() FROM usage_events").Scan(&count), "count raw rows")
	if count != n {
		t.Fatalf("raw rows: got %d, want exactly %d", count, n)
	}

	rows, err := p.ch.Conn.Query(ctx, `SELECT event_id, account_id, toString(environment), key_id, event_type,
		route, method, status, request_bytes, response_bytes, units, request_id, timestamp_us, timestamp
		FROM usage_events`)
	testenv.Must(t, err, "select raw rows")
	defer rows.Close()
	seen := map[string]bool{}
	for rows.Next() {
		var r rawRow
		testenv.Must(t, rows.Scan(&r.EventID, &r.Account, &r.Env, &r.KeyID, &r.Type, &r.Route, &r.Method,
			&r.Status, &r.RequestBytes, &r.ResponseBytes, &r.Units, &r.RequestID, &r.TimestampUS, &r.Timestamp), "scan")
		s, ok := byReqID[r.RequestID]
		if !ok {
			t.Fatalf("row with unknown request id %q", r.RequestID)
		}
		if seen[r.RequestID] {
			t.Fatalf("request %s landed twice", r.RequestID)
		}
		seen[r.RequestID] = true
		if want := "req_" + strings.ReplaceAll(r.EventID.String(), "-", ""); want != r.RequestID {
			t.Errorf("event id %s does not match request id %s", r.EventID, r.RequestID)
		}
		if r.EventID.Version() != 7 {
			t.Errorf("event id %s is UUID version %d, want 7", r.EventID, r.EventID.Version())
		}
		checks := []struct {
			field     string
			got, want any
		}{
			{"account_id", r.Account, "acct_e2e"},
			{"environment", r.Env, s.env},
			{"key_id", r.KeyID, s.keyID},
			{"event_type", r.Type, "api_call"},
			{"route", r.Route, s.path},
			{"method", r.Method, s.method},
			{"status", int(r.Status), s.status},
			{"request_bytes", int(r.RequestBytes), s.reqBytes},
			{"response_bytes", int(r.ResponseBytes), s.respBytes},
			{"units", r.Units, int64(1)},
		}
		for _, c := range checks {
			if c.got != c.want {
				t.Errorf("request %s: %s = %v, want %v", r.RequestID, c.field, c.got, c.want)
			}
		}
		ts := time.UnixMicro(int64(r.TimestampUS))
		if d := ts.Sub(s.at); d < -time.Second || d > 5*time.Second {
			t.Errorf("request %s: timestamp %s is %s from when it was sent", r.RequestID, ts, d)
		}
		if r.Timestamp.Unix() != ts.Unix() {
			t.Errorf("request %s: timestamp %s and timestamp_us %s disagree", r.RequestID, r.Timestamp, ts)
		}
	}
	testenv.Must(t, rows.Err(), "read rows")
	if len(seen) != n {
		t.Fatalf("distinct requests landed: %d, want %d", len(seen), n)
	}
	if got := p.upstream.Calls(); got != n {
		t.Fatalf("upstream served %d calls, want %d", got, n)
	}
}

func TestEdgeRejectsBadKeysWithOneErrorShape(t *testing.T) {
	p := startPipeline(t)
	good, _ := p.newKey(t, "acct_keys", schemas.Live)
	_, unknown, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate")
	_ = unknown
	unknownSecret, _, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate")
	tamper := []byte(good)
	tamper[12] ^= 1

	cases := []struct {
		name, auth, code string
	}{
		{"missing key is refused", "", "missing_api_key"},
		{"garbage key is refused as malformed", "Bearer hello", "malformed_api_key"},
		{"key with a bad checksum is refused as malformed", "Bearer " + string(tamper), "malformed_api_key"},
		{"well-formed unknown key is refused", "Bearer " + unknownSecret, "invalid_api_key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", p.edgeURL+"/v1/things", nil)
			if c.auth != "" {
				req.Header.Set("Authorization", c.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			testenv.Must(t, err, "call edge")
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", resp.StatusCode)
			}
			var body struct {
				Error edge.APIError `json:"error"`
			}
			testenv.Must(t, json.NewDecoder(resp.Body).Decode(&body), "decode error body")
			if body.Error.Code != c.code || body.Error.Type != edge.TypeAuthentication {
				t.Fatalf("error %+v, want code %s", body.Error, c.code)
			}
			if body.Error.RequestID == "" || body.Error.RequestID != resp.Header.Get(edge.HeaderRequestID) {
				t.Fatalf("error request_id %q does not match header %q", body.Error.RequestID, resp.Header.Get(edge.HeaderRequestID))
			}
		})
	}
	if p.upstream.Calls() != 0 {
		t.Fatalf("upstream was called %d times by refused requests", p.upstream.Calls())
	}
}

// An edge that cannot start says why, and closes what it had opened: a
// second edge on a spool directory in use, and an edge whose listen
// address is taken, get errors, not a crash.
func TestEdgeThatCannotStartReturnsItsError(t *testing.T) {
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	cfg := testConfig(t, pg, ch, testenv.NewTopic(t, 4))
	cfg.Edge.SpoolDir = t.TempDir()
	cfg.Edge.Upstream = "http://127.0.0.1:9" // never called
	first, err := NewEdgeMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "first edge")
	defer first.Close()
	_, err = NewEdgeMain(ctx, cfg, quietLog())
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("a second edge on the same spool directory: %v, want an error saying it is in use", err)
	}
	cfg.Edge.SpoolDir = t.TempDir()
	cfg.Edge.Listen = first.Addr()
	if _, err := NewEdgeMain(ctx, cfg, quietLog()); err == nil || !strings.Contains(err.Error(), "listen") {
		t.Errorf("an edge on a taken address: %v, want a listen error", err)
	}
	// With no spool_dir and no user cache directory (no $HOME, as under a
	// service manager's system unit), the edge refuses to start: before,
	// it spooled to the temporary directory, which such a manager may
	// delete when the service stops, losing the events waiting there.
	cfg.Edge.SpoolDir, cfg.Edge.Listen = "", "127.0.0.1:0"
	t.Setenv("HOME", "")
	t.Setenv("XDG_CACHE_HOME", "")
	if m, err := NewEdgeMain(ctx, cfg, quietLog()); err == nil || !strings.Contains(err.Error(), "edge.spool_dir") {
		if m != nil {
			_ = m.Close()
		}
		t.Errorf("an edge with no spool_dir and no cache directory: %v, want an error naming edge.spool_dir", err)
	}
}

// The edge reads the meters only for POST /v1/events' warnings, and its
// own configuration checks do not read them: a meters section the catalog
// refuses costs the warnings, not the edge.
func TestAnEdgeStartsOverMetersTheCatalogRefuses(t *testing.T) {
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	cfg := testConfig(t, pg, ch, testenv.NewTopic(t, 4))
	cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), "http://127.0.0.1:9"
	cfg.Meters = []meter.Meter{meter.Default(), meter.Default()} // one key twice
	if err := cfg.Validate("edge"); err != nil {
		t.Fatalf("the edge's checks: %v", err)
	}
	m, err := NewEdgeMain(context.Background(), cfg, quietLog())
	if err != nil {
		t.Fatalf("an edge over a meters section the catalog refuses did not start: %v", err)
	}
	_ = m.Close()
}

// A prune keeps at least the last day of failed authentications, and says
// so before it connects to anything.
func TestAuditPruneKeepsTheLastDay(t *testing.T) {
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"audit", "prune", "--older-than", "1h"})
	err := root.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "keep at least 24h0m0s") {
		t.Fatalf("audit prune --older-than 1h: %v, want refused", err)
	}
}
