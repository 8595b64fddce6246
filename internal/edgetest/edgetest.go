// Package edgetest runs real edge instances in-process for tests: each
// instance has its own key cache, change listener, limiter and producer,
// and all of them share one test database, Redis prefix and Kafka topic.
package edgetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/edge"
	edgefast "github.com/tollgate-dev/tollgate/edge/fasthttp"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/demo"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Env is the shared backing state of one test's edge fleet.
type Env struct {
	PG       *testenv.Postgres
	Redis    *testenv.Redis
	Topic    string
	Brokers  []string
	Store    *edgepg.KeyStore
	Live     *demo.Upstream
	Sandbox  *demo.Upstream
	LiveURL  string
	SandURL  string
	Log      *slog.Logger
	accounts map[string]bool
	started  []*Instance
}

// New sets up a database, Redis prefix, topic and two upstreams.
func New(t *testing.T) *Env {
	t.Helper()
	e := &Env{
		PG: testenv.NewPostgres(t), Redis: testenv.NewRedis(t), Topic: testenv.NewTopic(t, 4),
		Brokers: testenv.KafkaBrokers(), Live: &demo.Upstream{}, Sandbox: &demo.Upstream{},
		Log: Logger(), accounts: map[string]bool{},
	}
	e.Store = edgepg.NewKeyStore(e.PG.Pool)
	live := httptest.NewServer(e.Live)
	sand := httptest.NewServer(e.Sandbox)
	t.Cleanup(live.Close)
	t.Cleanup(sand.Close)
	e.LiveURL, e.SandURL = live.URL, sand.URL
	return e
}

// Logger discards unless the test runs verbose.
func Logger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return slog.New(slog.DiscardHandler)
}

// Key creates an account (if new) and a key, returning the secret and id.
func (e *Env) Key(t *testing.T, account string, kind edge.KeyKind, env schemas.Environment, scopes ...string) (string, string) {
	t.Helper()
	ctx := context.Background()
	if !e.accounts[account] {
		testenv.Must(t, e.Store.EnsureAccount(ctx, account, account), "ensure account")
		// Roomy limits unless a test sets a plan of its own (SetPlan).
		testenv.Must(t, e.Store.EnsureSubscription(ctx, account, "enterprise"), "subscribe")
		e.accounts[account] = true
	}
	secret, parsed, err := edge.GenerateKey(kind, env)
	testenv.Must(t, err, "generate key")
	id := "key_" + strings.ReplaceAll(schemas.NewEventID().String(), "-", "")[16:]
	testenv.Must(t, e.Store.CreateKey(ctx, edge.NewKey{ID: id, AccountID: account, Parsed: parsed, Scopes: scopes,
		Audit: edge.AuditInfo{Actor: "test"}}), "create key")
	e.Settle(t)
	return secret, id
}

// SetPlan subscribes account to a new plan with the given limits.
func (e *Env) SetPlan(t *testing.T, account, planID string, lim edge.Limits, upgradeURL string) {
	t.Helper()
	ctx := context.Background()
	def, err := json.Marshal(map[string]any{"limits": lim, "upgrade_url": upgradeURL})
	testenv.Must(t, err, "plan json")
	_, err = e.PG.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition)
		VALUES ($1, 1, $1, 'usd', $2) ON CONFLICT DO NOTHING`, planID, def)
	testenv.Must(t, err, "insert plan")
	_, err = e.PG.Pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at)
		VALUES ($1, $2, $3, 1, clock_timestamp())`, "sub_"+schemas.NewEventID().String(), account, planID)
	testenv.Must(t, err, "insert subscription")
	e.Settle(t)
}

// Settle waits until every running instance's listener has handled the
// change notifications sent so far. Postgres delivers notifications after
// the writing transaction commits and asynchronously, so without this a
// key's own "created" notification can land after the test's first call
// and empty a cache the test expects to be warm. It sends a marker (the
// hash of no key) and waits for each connected listener to pass it; a
// listener handles notifications in commit order, so all earlier ones
// are done by then.
func (e *Env) Settle(t *testing.T) {
	t.Helper()
	var marker [32]byte
	_, err := rand.Read(marker[:])
	testenv.Must(t, err, "marker")
	var waits []chan struct{}
	for _, in := range e.started {
		if in.Listener.Connected() {
			waits = append(waits, in.marks.expect(marker))
		}
	}
	if len(waits) == 0 {
		return
	}
	_, err = e.PG.Pool.Exec(context.Background(), `SELECT pg_notify($1, $2)`, edgepg.Channel, "key:"+hex.EncodeToString(marker[:]))
	testenv.Must(t, err, "notify marker")
	deadline := time.After(10 * time.Second)
	for _, w := range waits {
		select {
		case <-w:
		case <-deadline:
			t.Fatal("a key change listener did not pass the marker notification within 10s")
		}
	}
}

// markingCache is the instance's key cache as its listener sees it: it
// also tells Settle when a marker notification has been handled.
type markingCache struct {
	*edge.KeyCache
	mu      sync.Mutex
	waiting map[[32]byte]chan struct{}
}

func (m *markingCache) expect(h [32]byte) chan struct{} {
	ch := make(chan struct{})
	m.mu.Lock()
	if m.waiting == nil {
		m.waiting = map[[32]byte]chan struct{}{}
	}
	m.waiting[h] = ch
	m.mu.Unlock()
	return ch
}

// Invalidate forwards to the cache, then releases a waiting Settle.
func (m *markingCache) Invalidate(inv edge.Invalidation) {
	m.KeyCache.Invalidate(inv)
	if len(inv.KeyHash) != 32 {
		return
	}
	m.mu.Lock()
	if ch, ok := m.waiting[[32]byte(inv.KeyHash)]; ok {
		close(ch)
		delete(m.waiting, [32]byte(inv.KeyHash))
	}
	m.mu.Unlock()
}

// CountingStore counts lookups that reach the database.
type CountingStore struct {
	edge.KeyStore
	N atomic.Int64
}

// KeyByHash counts and delegates.
func (c *CountingStore) KeyByHash(ctx context.Context, h [32]byte) (edge.Key, error) {
	c.N.Add(1)
	return c.KeyStore.KeyByHash(ctx, h)
}

// Events collects emitted events in memory.
type Events struct {
	ch chan schemas.Event
}

// Emit implements edge.Emitter.
func (m *Events) Emit(ev schemas.Event) { m.ch <- ev }

// Instance is one running edge.
type Instance struct {
	URL      string
	Cache    *edge.KeyCache
	Store    *CountingStore
	Listener *edgepg.Listener
	Producer *edgekafka.Producer
	// Front is the fasthttp front (nil with Options.NetHTTP).
	Front    *edgefast.Front
	Registry *prometheus.Registry
	Audit    *edgepg.AuditWriter
	marks    *markingCache
	stop     sync.Once
	stopHTTP func()
}

// Stop stops the instance's HTTP server as `tollgate edge` stops it (the
// test's cleanup does the rest); later calls do nothing.
func (in *Instance) Stop() { in.stop.Do(in.stopHTTP) }

// Options adjust an instance.
type Options struct {
	// Config edits the edge config before the server is built.
	Config func(*edge.Config)
	// RedisAddr overrides the Redis address (e.g. one where nothing listens).
	RedisAddr string
	// Brokers and Topic override where events go.
	Brokers []string
	Topic   string
	// Now is the edge's clock (nil: time.Now).
	Now func() time.Time
	// NetHTTP serves the edge with its net/http handler instead of the
	// fasthttp front that `tollgate edge` runs.
	NetHTTP bool
	// Ready is the edge's readiness check (nil: always ready).
	Ready func(context.Context) error
	// Meters lists the meters in force, for POST /v1/events' warnings
	// (nil: none checked).
	Meters edge.MeterLister
}

// Start runs an edge instance with its own cache, listener and producer.
func (e *Env) Start(t *testing.T, o Options) *Instance {
	t.Helper()
	cfg := edge.Config{Listen: "127.0.0.1:0", Upstream: e.LiveURL, SandboxUpstream: e.SandURL,
		UpstreamTimeout: 2 * time.Second, RateLimitPrefix: e.Redis.Prefix, KeyCacheTTL: 30 * time.Second,
		// The tests' upstreams switch to a protocol of their own, "echo".
		UpgradeProtocols: []string{"websocket", "echo"}}
	if o.Config != nil {
		o.Config(&cfg)
	}
	reg := prometheus.NewRegistry()
	in := &Instance{Registry: reg}
	in.Store = &CountingStore{KeyStore: e.Store}
	in.Cache = edge.NewKeyCache(in.Store, cfg.KeyCacheTTL)
	in.Cache.SetLookupTimeout(cfg.KeyLookupTimeout)
	in.marks = &markingCache{KeyCache: in.Cache}
	in.Listener = edgepg.NewListener(e.PG.URL, in.marks, e.Log)
	lctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	testenv.Must(t, in.Listener.Start(lctx), "start listener")
	brokers := e.Brokers
	if o.Brokers != nil {
		brokers = o.Brokers
	}
	topic := e.Topic
	if o.Topic != "" {
		topic = o.Topic
	}
	var err error
	in.Producer, err = edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: t.TempDir(),
		CloseTimeout: 20 * time.Second}, reg, e.Log)
	testenv.Must(t, err, "start producer")
	raddr := testenv.RedisAddr()
	if o.RedisAddr != "" {
		raddr = o.RedisAddr
	}
	rdb := redis.NewClient(&redis.Options{Addr: raddr, DialTimeout: 200 * time.Millisecond,
		ReadTimeout: 200 * time.Millisecond, WriteTimeout: 200 * time.Millisecond, MaxRetries: -1, DialerRetries: 1})
	lim := &edge.FallbackLimiter{Primary: edgeredis.NewLimiter(rdb), Local: edge.NewLocalLimiter(cfg.ExpectedInstances),
		OnFallback: func(string, error) {}}
	in.Audit, err = edgepg.NewAuditWriter(e.PG.Pool, 100*time.Millisecond, reg, e.Log)
	testenv.Must(t, err, "start audit writer")
	srv, err := edge.NewServer(cfg, edge.Deps{Keys: in.Cache, Emitter: in.Producer, Limiter: lim, Quota: lim,
		Auditor: in.Audit, Registry: reg, Log: e.Log, Now: o.Now, Ready: o.Ready, Meters: o.Meters})
	testenv.Must(t, err, "new server")
	var stop func()
	if o.NetHTTP {
		hs := httptest.NewServer(srv)
		in.URL, stop = hs.URL, hs.Close
	} else {
		front, err := edgefast.New(srv, e.Log)
		testenv.Must(t, err, "new fasthttp front")
		in.Front = front
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		testenv.Must(t, err, "listen")
		go func() { _ = front.Serve(ln) }()
		scheme := "http://"
		if cfg.TLSCertFile != "" {
			scheme = "https://"
		}
		in.URL, stop = scheme+ln.Addr().String(), func() {
			// As tollgate edge stops: calls in flight finish first, then
			// what is left is cut.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = front.Shutdown(ctx)
			_, _ = front.Close()
		}
	}
	in.stopHTTP = stop
	e.started = append(e.started, in)
	t.Cleanup(func() {
		// A stopped instance's listener no longer passes notifications:
		// Settle must not wait for it.
		e.started = slices.DeleteFunc(e.started, func(s *Instance) bool { return s == in })
		in.Stop()
		_ = in.Audit.Close()
		_ = in.Producer.Close()
		_ = rdb.Close()
	})
	return in
}

// Response is a decoded edge response.
type Response struct {
	Status int
	Header http.Header
	Body   []byte
	// Trailer holds the fields that followed the body.
	Trailer http.Header
	Error   edge.APIError
}

// Do sends one call with key (may be empty) and decodes the error body.
func Do(t *testing.T, method, url, key string, body io.Reader) Response {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	testenv.Must(t, err, "new request")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	return DoRequest(t, req)
}

// DoRequest sends req as Do does, with whatever headers it carries.
func DoRequest(t *testing.T, req *http.Request) Response {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, req.Method+" "+req.URL.String())
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r := Response{Status: resp.StatusCode, Header: resp.Header, Body: b, Trailer: resp.Trailer}
	if resp.StatusCode >= 400 && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		var env struct {
			Error edge.APIError `json:"error"`
		}
		_ = json.Unmarshal(b, &env)
		r.Error = env.Error
	}
	return r
}

// ReadTopic reads every event in topic, waiting up to timeout for at least
// want of them, and returns them all. A read that fails (a topic just made
// may have no leader yet for a moment) is tried again until the timeout,
// and the test fails with its error after that.
func ReadTopic(t *testing.T, brokers []string, topic string, want int, timeout time.Duration) []schemas.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		evs, err := readAll(brokers, topic)
		if errors.Is(err, errUndecodable) {
			t.Fatal(err)
		}
		if err == nil && len(evs) >= want {
			return evs
		}
		if time.Now().After(deadline) {
			testenv.Must(t, err, "read topic "+topic)
			return evs
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// errUndecodable marks a record in the topic that is not a valid event.
var errUndecodable = errors.New("undecodable event")

func readAll(brokers []string, topic string) ([]schemas.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := kafka.DialContext(ctx, "tcp", brokers[0])
	if err != nil {
		return nil, fmt.Errorf("dial kafka: %w", err)
	}
	parts, err := conn.ReadPartitions(topic)
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("read partitions: %w", err)
	}
	var out []schemas.Event
	for _, p := range parts {
		evs, err := readPartition(ctx, brokers[0], topic, p.ID)
		if err != nil {
			return nil, err
		}
		out = append(out, evs...)
	}
	return out, nil
}

func readPartition(ctx context.Context, broker, topic string, partition int) ([]schemas.Event, error) {
	pc, err := kafka.DialLeader(ctx, "tcp", broker, topic, partition)
	if err != nil {
		return nil, fmt.Errorf("dial leader of partition %d: %w", partition, err)
	}
	defer pc.Close()
	first, last, err := pc.ReadOffsets()
	if err != nil {
		return nil, fmt.Errorf("read offsets of partition %d: %w", partition, err)
	}
	var out []schemas.Event
	for off := first; off < last; {
		if _, err := pc.Seek(off, kafka.SeekAbsolute); err != nil {
			return nil, fmt.Errorf("seek partition %d to %d: %w", partition, off, err)
		}
		_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := pc.ReadBatch(1, 10<<20)
		read := off
		for {
			m, err := b.ReadMessage()
			if err != nil {
				break
			}
			ev, err := schemas.Decode(m.Value, time.Now().Add(time.Hour))
			if err != nil {
				// A record the edge wrote that does not decode is a finding,
				// not a moment's unavailability.
				_ = b.Close()
				return nil, fmt.Errorf("%w: partition %d offset %d: %w", errUndecodable, partition, m.Offset, err)
			}
			out = append(out, ev)
			off = m.Offset + 1
		}
		_ = b.Close()
		if off == read {
			return nil, fmt.Errorf("partition %d: no record at offset %d of %d", partition, off, last)
		}
	}
	return out, nil
}

// CheckOtherMethods asks url (with the bearer token, when not empty) with
// every RFC 9110 method but those in allow ("GET" or "GET, POST"), and fails
// t unless each is refused with 405 method_not_allowed in the one error
// shape with allow as its Allow header, and an OPTIONS is answered 204 (with
// allow and OPTIONS as Allow, if any): the method is wrong, the path is not
// unknown.
func CheckOtherMethods(t *testing.T, url, token, allow string) {
	t.Helper()
	took := map[string]bool{}
	for _, m := range strings.Split(allow, ",") {
		took[strings.TrimSpace(m)] = true
	}
	for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions, http.MethodTrace, "PROPFIND", "REPORT", "BREW"} {
		if took[m] {
			continue
		}
		req, err := http.NewRequest(m, url, nil)
		if err != nil {
			t.Fatalf("%s %s: %v", m, url, err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", m, url, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if m == "BREW" {
			// A method no one knows is refused with 501, whatever the
			// path.
			if resp.StatusCode != http.StatusNotImplemented || !strings.Contains(string(body), `"method_not_implemented"`) ||
				!strings.Contains(string(body), `"request_id":"req_`) {
				t.Errorf("BREW %s: %d %s; want 501 method_not_implemented with a request id", url, resp.StatusCode, body)
			}
			continue
		}
		if m == http.MethodOptions {
			// Under CORS middleware, an OPTIONS is its to answer (204,
			// without Allow).
			if got := resp.Header.Get("Allow"); resp.StatusCode != http.StatusNoContent || got != "" && got != allow+", OPTIONS" {
				t.Errorf("OPTIONS %s: %d, Allow %q; want 204 with Allow %q", url, resp.StatusCode, resp.Header.Get("Allow"), allow+", OPTIONS")
			}
			continue
		}
		if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != allow {
			t.Errorf("%s %s: %d, Allow %q, %s; want 405 with Allow %q", m, url, resp.StatusCode, resp.Header.Get("Allow"), body, allow)
			continue
		}
		if m == http.MethodHead {
			continue // no body
		}
		var e struct {
			Error struct{ Type, Code, Message string } `json:"error"`
		}
		if err := json.Unmarshal(body, &e); err != nil || e.Error.Code != "method_not_allowed" || e.Error.Type != edge.TypeInvalidRequest {
			t.Errorf("%s %s: body %s; want the one error shape with code method_not_allowed", m, url, body)
		}
	}
}
