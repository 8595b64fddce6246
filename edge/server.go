package edge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// eventsScope is the scope POST /v1/events needs.
const eventsScope = "events:write"

// HeaderRequestID names the response header (and event field) that ties a
// call to its usage event.
const HeaderRequestID = "Request-Id"

// Deps are the edge's collaborators. Limiter, Quota and Auditor may be nil
// (no limits, no quota, no failed-auth audit), which tests and the bench's
// plain-proxy mode use.
type Deps struct {
	Keys     KeyStore
	Emitter  Emitter
	Limiter  RateLimiter
	Quota    QuotaCounter
	Auditor  Auditor
	Registry prometheus.Registerer
	Log      *slog.Logger
	// Ready reports whether the edge can serve (for /readyz).
	Ready func(ctx context.Context) error
	// Now is the clock for key expiry, quota months and event times; nil
	// is time.Now (tests set it to place calls at chosen instants).
	Now func() time.Time
	// Meters lists the meters in force (the configuration file's and
	// those created through the admin API), so that POST /v1/events can
	// warn of an event of a type no meter counts; nil warns of none.
	Meters MeterLister
}

// MeterLister lists the meters in force (aggregator.Catalog).
type MeterLister interface {
	Meters(ctx context.Context) ([]meter.Meter, error)
}

// Server is the edge HTTP handler.
type Server struct {
	cfg     Config
	deps    Deps
	log     *slog.Logger
	now     func() time.Time
	router  *Router
	live    *httputil.ReverseProxy
	sandbox *httputil.ReverseProxy
	// buffers lends both proxies their copy buffers.
	buffers *bufferPool
	echo    *echo.Echo
	m       *metrics
	// upgrades counts the upgraded connections open, for the cap.
	upgrades atomic.Int64
	// cors is nil unless edge.cors allows some origin.
	cors *CORS
	// counted are the event types the meters count (deps.Meters).
	counted countedTypes
	// zones caches loaded time zones by name (*time.Location, or nil for
	// a name that does not load): LoadLocation reads the zone database.
	zones sync.Map
	// allowCall decides a call's limits: in one step when the limiter
	// also counts the quota (one Redis round trip), else step by step.
	allowCall func(context.Context, CallLimits) (CallResult, error)
	// sharedKeys is deps.Keys when it can share its keys (KeyCache).
	sharedKeys sharedKeyStore
	// keyLimits keeps each key's bucket names and quota month, by key ID.
	keyLimits limitNamesCache
	// trusted are edge.trusted_proxies.
	trusted TrustedProxies
}

type metrics struct {
	duration  *prometheus.HistogramVec
	responses *prometheus.CounterVec
	authFail  *prometheus.CounterVec
	limited   *prometheus.CounterVec
	upgraded  prometheus.Gauge
	// byStatus and byRoute keep each status code's counter and each
	// route's histogram once used, so a call finds its series without the
	// vectors hashing its labels every time.
	byStatus [600]atomic.Pointer[counter]
	byRoute  sync.Map // route label → prometheus.Observer
}

type counter struct{ prometheus.Counter }

// response is the response counter for status code.
func (m *metrics) response(code int) prometheus.Counter {
	if code < 0 || code >= len(m.byStatus) {
		return m.responses.WithLabelValues(strconv.Itoa(code))
	}
	if c := m.byStatus[code].Load(); c != nil {
		return c.Counter
	}
	c := &counter{m.responses.WithLabelValues(strconv.Itoa(code))}
	m.byStatus[code].Store(c)
	return c.Counter
}

// latency is the duration histogram for route (a bounded set of labels:
// route templates, "*" and "unauthenticated").
func (m *metrics) latency(route string) prometheus.Observer {
	if o, ok := m.byRoute.Load(route); ok {
		return o.(prometheus.Observer)
	}
	o := m.duration.WithLabelValues(route)
	m.byRoute.Store(route, o)
	return o
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tollgate_edge_request_duration_seconds",
			Help:    "Time from request to response, by route template (p50/p95/p99 via histogram_quantile).",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"route"}),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_edge_responses_total",
			Help: "Responses by HTTP status code.",
		}, []string{"code"}),
		authFail: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_edge_auth_failures_total",
			Help: "Refused authentications by reason.",
		}, []string{"reason"}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_edge_limited_total",
			Help: "Calls refused by a rate limit or quota, by limit.",
		}, []string{"limit"}),
		upgraded: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tollgate_edge_upgraded_connections",
			Help: "Calls switched to another protocol (WebSocket) whose connections are still open.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.duration, m.responses, m.authFail, m.limited, m.upgraded} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register edge metrics: %w", err)
		}
	}
	return m, nil
}

// NewServer builds the edge handler.
func NewServer(cfg Config, deps Deps) (*Server, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	router, err := NewRouter(cfg.Routes)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(deps.Registry)
	if err != nil {
		return nil, err
	}
	now := deps.Now
	if now == nil {
		now = time.Now
	}
	s := &Server{cfg: cfg, deps: deps, log: deps.Log, now: now, router: router, m: m, buffers: newBufferPool(), cors: NewCORS(cfg.CORS)}
	// The first read of the meters, in the background.
	s.counted.get(s)
	s.trusted, _ = ParseTrustedProxies("edge.trusted_proxies", cfg.TrustedProxies) // validated above
	s.sharedKeys, _ = deps.Keys.(sharedKeyStore)
	s.allowCall = func(ctx context.Context, c CallLimits) (CallResult, error) {
		return AllowCallEach(ctx, deps.Limiter, deps.Quota, c)
	}
	if cl, ok := deps.Limiter.(CallLimiter); ok && (deps.Quota == nil || any(deps.Quota) == any(deps.Limiter)) {
		s.allowCall = cl.AllowCall
	}
	if s.live, err = s.newProxy(cfg.Upstream); err != nil {
		return nil, err
	}
	// Test-mode calls have a pool of their own, as on the fasthttp front.
	sandbox := cfg.SandboxUpstream
	if sandbox == "" {
		sandbox = cfg.Upstream
	}
	if s.sandbox, err = s.newProxy(sandbox); err != nil {
		return nil, err
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = errorHandler(s.log)
	e.Use(s.observe, s.requestID, s.corsMiddleware)
	e.GET("/healthz", func(c echo.Context) error { return c.String(http.StatusOK, "ok\n") })
	e.GET("/readyz", s.readyz)
	e.POST("/v1/events", s.reportEvents, s.authenticate, s.authorize, s.limit(false))
	e.Any("/*", s.proxy, s.authenticate, s.authorize, s.limit(true))
	// Any registers echo's own list of methods only. Another method takes
	// the same path, so its caller's key is read and the refusal (405
	// method_not_allowed) carries the rate limits, as on the fasthttp
	// front; echo's router would answer it before any of that.
	e.RouteNotFound("/*", s.proxy, s.authenticate, s.authorize, s.limit(true))
	s.echo = e
	return s, nil
}

// ServeHTTP makes the Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if IsUpgrade(r.Header) && !s.UpgradeAllowed(r.Header.Get("Upgrade")) {
		dropUpgrade(r.Header)
	}
	s.echo.ServeHTTP(w, r)
}

func (s *Server) readyz(c echo.Context) error {
	if s.deps.Ready != nil {
		if err := s.deps.Ready(c.Request().Context()); err != nil {
			// The cause (a database's address, say) is for the operator's
			// log; /readyz is also on the public listener.
			s.log.Warn("not ready", "err", err)
			return NewAPIError(http.StatusServiceUnavailable, TypeAPI, "not_ready", "a dependency of the edge is unavailable; see the edge's log")
		}
	}
	return c.String(http.StatusOK, "ready\n")
}

func (s *Server) observe(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		start := time.Now()
		// Deferred, so an aborted call (net/http's proxy panics with
		// http.ErrAbortHandler when a body breaks off) is counted too.
		defer func() {
			r, ok := c.Get("route").(Route)
			end := time.Now()
			if t, ok := c.Get(handshakeEnd).(time.Time); ok {
				// An upgrade: its handshake's time, not the connection's
				// lifetime, which would swamp the route's percentiles.
				end = t
			}
			s.Observe(r, ok, c.Response().Status, end.Sub(start))
		}()
		if err := next(c); err != nil {
			c.Error(err)
		}
		return nil
	}
}

// UpgradeOpened counts a call that asks to switch to another protocol as
// open (in tollgate_edge_upgraded_connections) until closed is called, or
// refuses it with 503 when max_upgraded_connections are open already.
// upgradeSlot is the echo context key of an upgrade's closed func.
const upgradeSlot = "upgrade_slot"

func (s *Server) UpgradeOpened() (closed func(), err error) {
	if s.upgrades.Add(1) > int64(s.cfg.MaxUpgradedConnections) {
		s.upgrades.Add(-1)
		return nil, RetryShortly(NewAPIError(http.StatusServiceUnavailable, TypeAPI, "too_many_upgraded_connections",
			fmt.Sprintf("This edge holds %d upgraded connections already; retry later.", s.cfg.MaxUpgradedConnections)))
	}
	s.m.upgraded.Inc()
	return func() {
		s.upgrades.Add(-1)
		s.m.upgraded.Dec()
	}, nil
}

// Observe counts a response in the metrics: its status, and its duration
// under its route's template (routed false: not routed, as for a call
// refused before its route was known).
func (s *Server) Observe(r Route, routed bool, status int, d time.Duration) {
	route := "unauthenticated"
	if routed {
		route = r.Template
		if s.router.Open() {
			route = "*" // raw paths would make the label unbounded
		}
	}
	s.m.latency(route).Observe(d.Seconds())
	s.m.response(status).Inc()
}

func (s *Server) requestID(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		id, rid := NewRequestID()
		c.Set("event_id", id)
		c.Response().Header().Set(HeaderRequestID, rid)
		return next(c)
	}
}

// corsMiddleware answers browsers' preflights and labels every answer for
// an origin edge.cors allows.
func (s *Server) corsMiddleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if s.cors == nil {
			return next(c)
		}
		req := c.Request()
		origin := req.Header.Get("Origin")
		h := c.Response().Header()
		set := func(name, value string) { h.Set(name, value) }
		if method := req.Header.Get("Access-Control-Request-Method"); IsPreflight(req.Method, origin, method) {
			if err := s.cors.Preflight(origin, method, req.Header.Get("Access-Control-Request-Headers"), set); err != nil {
				return err
			}
			return c.NoContent(http.StatusNoContent)
		}
		s.cors.Label(origin, set)
		return next(c)
	}
}

// CORS is how the edge answers browsers on other origins; nil when
// edge.cors allows none.
func (s *Server) CORS() *CORS { return s.cors }

// NewRequestID is a new call's event id and its Request-Id.
func NewRequestID() (uuid.UUID, string) {
	id := schemas.NewEventID()
	return id, RequestIDFor(id)
}

// Now is the Server's clock (Deps.Now).
func (s *Server) Now() time.Time { return s.now() }

// Config is the Server's configuration, defaults filled in.
func (s *Server) Config() Config { return s.cfg }

// RequestIDFor is the Request-Id header value of the call with event id id.
func RequestIDFor(id uuid.UUID) string {
	const digits = "0123456789abcdef"
	var b [4 + 32]byte
	n := copy(b[:], "req_")
	for _, c := range id {
		b[n], b[n+1] = digits[c>>4], digits[c&0x0f]
		n += 2
	}
	return string(b[:])
}

// keyFromAuthorization extracts the key from an Authorization header,
// "Bearer <key>" or HTTP basic auth's user name, as Stripe accepts.
func keyFromAuthorization(h string) string {
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	if len(h) > 6 && strings.EqualFold(h[:6], "basic ") {
		dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(h[6:]))
		if err != nil {
			return ""
		}
		user, _, ok := strings.Cut(string(dec), ":")
		if !ok {
			return ""
		}
		return user
	}
	return ""
}

// safePrefix is at most the part of a presented string that a valid key
// would show as its display prefix, with anything odd replaced, so the
// audit log never holds more than a display prefix. A string that does not
// start as a key does (pk_ or sk_, then live_ or test_) leaves none: it may
// be a short password or token sent by mistake, which its first 12
// characters would hold whole.
func safePrefix(raw string) string {
	if len(raw) < prefixLen || (raw[:3] != "pk_" && raw[:3] != "sk_") || (raw[3:prefixLen] != "live_" && raw[3:prefixLen] != "test_") {
		return ""
	}
	if len(raw) > prefixLen+displayBody {
		raw = raw[:prefixLen+displayBody]
	}
	b := []byte(raw)
	for i, c := range b {
		if !(c == '_' || strings.IndexByte(base62, c) >= 0) {
			b[i] = '?'
		}
	}
	return string(b)
}

// hostOnly is addr without its port, if it has one.
func hostOnly(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}

// CallInfo is what deciding a call needs from its request, whichever HTTP
// server carried it.
type CallInfo struct {
	Method string
	// Path is the path as the upstream gets it, still percent-encoded;
	// routes are matched on its RoutePath.
	Path string
	// Authorization is the raw Authorization header.
	Authorization string
	// RemoteAddr is the caller's address, host or host:port.
	RemoteAddr string
	// Remote stands in for RemoteAddr when that is empty. It is formatted
	// only when needed (for a refused call's audit event), not on every
	// call.
	Remote net.Addr
	// Forwarded gives the call's X-Forwarded-For, read for a refused
	// call's audit event when the call came through a trusted proxy
	// (edge.trusted_proxies); nil: none.
	Forwarded Forwarded
	// At is when the call arrived, by the server's clock (Now); zero is
	// now. A front that has read the clock already passes it on, so a call
	// reads it once.
	At time.Time
	// MethodOverride is what the call's MethodOverrideHeaders ask for
	// (PickMethodOverride), if any: the method an upstream framework may
	// run instead of Method.
	MethodOverride string
	// Upgrade says the call asks to switch protocols (a WebSocket
	// handshake): Admit then takes one of max_upgraded_connections before
	// the limits, so a call refused for want of one costs no quota.
	Upgrade bool
}

// at is when the call arrived.
func (s *Server) at(ci CallInfo) time.Time {
	if ci.At.IsZero() {
		return s.now()
	}
	return ci.At
}

// UpgradeAsked reports whether got, the protocol an upstream switched to
// (its 101's Upgrade), is one of those a caller's Upgrade header (asked)
// listed: by name, case aside, and by version when both give one
// (websocket/13 answered websocket is the switch asked for).
func UpgradeAsked(asked, got string) bool {
	// got must be one protocol, a token with perhaps a token for its
	// version: "websocket/13, h2c" is two, one of them not asked for.
	gotName, gotVersion, versioned := strings.Cut(strings.TrimSpace(got), "/")
	if !isToken(gotName) || versioned && !isToken(gotVersion) {
		return false
	}
	for _, p := range strings.Split(asked, ",") {
		name, version, _ := strings.Cut(strings.TrimSpace(p), "/")
		if strings.EqualFold(name, gotName) && (version == "" || gotVersion == "" || strings.EqualFold(version, gotVersion)) {
			return true
		}
	}
	return false
}

// isToken reports whether s is an RFC 9110 token (5.6.2).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}

// IsFraming reports whether name is a header that frames the message or
// names its host: Connection may not make one hop-by-hop. Dropped, a
// request's Content-Length turned a call with a body into a 502 on the
// fasthttp front (its body then overran the length of 0 the upstream was
// sent).
func IsFraming(name string) bool {
	return strings.EqualFold(name, "Content-Length") || strings.EqualFold(name, "Transfer-Encoding") ||
		strings.EqualFold(name, "Host")
}

// ConnectionNamed are the header names (canonical) a message's Connection
// lines name, framing fields aside: hop-by-hop headers of the connection
// it came on.
func ConnectionNamed(h http.Header) map[string]bool {
	var named map[string]bool
	for _, c := range h.Values("Connection") {
		for _, name := range strings.Split(c, ",") {
			if name = strings.TrimSpace(name); name != "" && !IsFraming(name) {
				if named == nil {
					named = map[string]bool{}
				}
				named[http.CanonicalHeaderKey(name)] = true
			}
		}
	}
	return named
}

// dropSwitchHopByHop leaves, of the hop-by-hop headers of an upstream's
// 101, only the switch itself (Connection: Upgrade and Upgrade): net/http's
// ReverseProxy hands a 101's headers to the caller as they came, those the
// upstream's Connection named for its own hop included.
func dropSwitchHopByHop(h http.Header) {
	for name := range ConnectionNamed(h) {
		if name != "Upgrade" {
			h.Del(name)
		}
	}
	for _, name := range [...]string{"Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer"} {
		h.Del(name)
	}
	h.Set("Connection", "Upgrade")
}

// clientAddr is the caller's address as the audit log names it: the
// peer's, or through a trusted proxy, the one it forwarded for.
func (s *Server) clientAddr(ci CallInfo) string {
	var forwarded []string
	if len(s.trusted) > 0 && ci.Forwarded != nil {
		forwarded = ci.Forwarded.ForwardedFor()
	}
	return s.trusted.ClientAddr(ci.remoteAddr(), forwarded)
}

// remoteAddr is the caller's address, host or host:port.
func (ci CallInfo) remoteAddr() string {
	if ci.RemoteAddr == "" && ci.Remote != nil {
		return ci.Remote.String()
	}
	return ci.RemoteAddr
}

// Admission is a call that may go ahead: its key and route.
type Admission struct {
	Key   *Key
	Route Route
	// Routed reports whether Route was matched (also on a refusal, for
	// the metrics' route label).
	Routed bool
	// UpgradeClosed, on an admitted upgrade, gives back the upgraded
	// connection Admit took (see Server.UpgradeOpened).
	UpgradeClosed func()
	// KeyEpoch is the key store's invalidation count read before Key was
	// looked up, for HoldKey.
	KeyEpoch uint64
}

// keyHolder is a key store that can hold calls open under a key: the
// KeyCache (keyholds.go).
type keyHolder interface {
	Epoch() uint64
	Hold(k *Key, epoch uint64, end func()) (release func())
}

// keyEpoch is the key store's invalidation count (0 for a store that
// cannot hold calls), read before a key is looked up.
func (s *Server) keyEpoch() uint64 {
	if h, ok := s.deps.Keys.(keyHolder); ok {
		return h.Epoch()
	}
	return 0
}

// HoldKey ends a call that outlives its admission, an upgraded connection,
// by calling end once k is no longer usable: at its expiry, or when its key
// is revoked (as the key cache learns of it). epoch is the admission's
// KeyEpoch. Call release when the call ends.
func (s *Server) HoldKey(k *Key, epoch uint64, end func()) (release func()) {
	if h, ok := s.deps.Keys.(keyHolder); ok {
		return h.Hold(k, epoch, end)
	}
	// A store that hears of no changes: the expiry still ends the call.
	if k.ExpiresAt == nil {
		return func() {}
	}
	t := time.AfterFunc(k.ExpiresAt.Sub(s.now()), end)
	return func() { t.Stop() }
}

// Admit authenticates, authorizes and limits a proxied call, the monthly
// quota included, writing the rate-limit headers through setHeader (which
// must copy the value). Its errors are rendered by RenderError.
func (s *Server) Admit(ctx context.Context, ci CallInfo, setHeader func(name string, value []byte)) (Admission, error) {
	a := Admission{KeyEpoch: s.keyEpoch()}
	k, err := s.authenticateCall(ctx, ci)
	if err != nil {
		return a, err
	}
	a.Key = k
	if a.Route, err = s.authorizeCall(k, ci, false); err != nil {
		return a, s.refuseWithLimits(ctx, k, err, setHeader)
	}
	a.Routed = true
	if ci.Upgrade {
		if a.UpgradeClosed, err = s.UpgradeOpened(); err != nil {
			return a, err
		}
	}
	if err := s.limitCall(ctx, k, true, s.at(ci), setHeader); err != nil {
		if a.UpgradeClosed != nil {
			a.UpgradeClosed()
			a.UpgradeClosed = nil
		}
		return a, err
	}
	return a, nil
}

func (s *Server) authFailed(ci CallInfo, reason, prefix string, k *Key, err error) error {
	s.m.authFail.WithLabelValues(reason).Inc()
	if s.deps.Auditor != nil {
		ev := AuditEvent{At: s.now(), Actor: "api", Action: ActionAuthFailed, KeyPrefix: prefix,
			RemoteAddr: s.clientAddr(ci), Reason: reason, Count: 1}
		if k != nil {
			ev.AccountID, ev.KeyID = k.AccountID, k.ID
		}
		s.deps.Auditor.Record(ev)
	}
	return err
}

// MayReportEvents reports whether authorization carries a key that may
// call POST /v1/events at at, recording nothing. A front asks it before it
// reads a body into memory, so a caller who will be refused anyway cannot
// make it hold megabytes; the handler then answers, and audits, as usual.
// When the key store cannot answer it says yes, and the handler decides.
func (s *Server) MayReportEvents(ctx context.Context, authorization string, at time.Time) bool {
	raw := keyFromAuthorization(authorization)
	if raw == "" {
		return false
	}
	pk, err := ParseKey(raw)
	if err != nil {
		return false
	}
	k, err := s.keyByHash(ctx, pk.Hash)
	if err != nil {
		return !errors.Is(err, ErrKeyNotFound)
	}
	return HashEqual(k.Hash, pk.Hash[:]) && k.Usable(at) == nil && HasScope(k.Kind, k.Scopes, eventsScope)
}

func (s *Server) authenticateCall(ctx context.Context, ci CallInfo) (*Key, error) {
	k, reason, prefix, cause, err := authenticate(ctx, s, keyFromAuthorization(ci.Authorization), s.at(ci))
	switch {
	case err == nil:
		return k, nil
	case reason == "":
		s.log.Error("key lookup failed", "err", cause)
		return nil, err
	}
	return nil, s.authFailed(ci, reason, prefix, k, err)
}

// lookupKey is keyByHash, for authenticate.
func (s *Server) lookupKey(ctx context.Context, hash [32]byte) (*Key, error) {
	return s.keyByHash(ctx, hash)
}

// keyByHash looks a key up, without copying it when the store shares its
// own (the returned key is read-only either way).
func (s *Server) keyByHash(ctx context.Context, hash [32]byte) (*Key, error) {
	if s.sharedKeys != nil {
		k, err := s.sharedKeys.sharedKeyByHash(ctx, hash)
		if err == nil && k == nil {
			err = ErrKeyNotFound
		}
		return k, err
	}
	k, err := s.deps.Keys.KeyByHash(ctx, hash)
	if err != nil {
		return nil, err
	}
	return &k, nil
}

func (s *Server) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		r := c.Request()
		epoch := s.keyEpoch()
		k, err := s.authenticateCall(r.Context(), callInfoOf(r))
		if err != nil {
			return err
		}
		c.Set("key", k)
		c.Set(keyEpochCtx, epoch)
		return next(c)
	}
}

// callInfoOf is what authentication reads of a call on the net/http front.
func callInfoOf(r *http.Request) CallInfo {
	return CallInfo{Method: r.Method, Path: r.URL.Path, Authorization: r.Header.Get("Authorization"),
		RemoteAddr: r.RemoteAddr, Forwarded: HeaderForwarded(r.Header)}
}

// MethodOverrideHeaders are the headers web frameworks (Rails, Laravel,
// Symfony, Express's method-override) read as the request's real method.
// Routes and scopes are checked on the method sent, so a call whose
// override names another is refused: a key allowed POST could otherwise
// have an upstream run DELETE.
var MethodOverrideHeaders = [...]string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}

// keyEpochCtx holds, on the net/http front, the key store's invalidation
// count read before the call's key was looked up.
const keyEpochCtx = "tollgate.key_epoch"

// authorizeCall matches the route (events: the events route) and checks
// the key may call it.
func (s *Server) authorizeCall(k *Key, ci CallInfo, events bool) (Route, error) {
	if !knownMethod(ci.Method) {
		ae := NewAPIError(http.StatusMethodNotAllowed, TypeInvalidRequest, "method_not_allowed",
			fmt.Sprintf("Method %s is not supported.", ci.Method))
		ae.Allow = AllowedMethods
		return Route{}, ae
	}
	if ci.MethodOverride != "" && !strings.EqualFold(strings.TrimSpace(ci.MethodOverride), ci.Method) {
		return Route{}, NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "method_override_not_allowed",
			fmt.Sprintf("The call is a %s asking, in a method-override header or the _method query parameter, for %s; routes and scopes are checked on the method sent, so send %s itself.",
				ci.Method, strconv.QuoteToASCII(ci.MethodOverride), strconv.QuoteToASCII(strings.TrimSpace(ci.MethodOverride))))
	}
	var route Route
	if events {
		route = Route{Template: "/v1/events", Scopes: []string{eventsScope}, Write: true}
	} else {
		path, err := RoutePath(ci.Path)
		if err != nil {
			return Route{}, NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_path",
				"The path has a \".\" or \"..\" segment, a backslash or a malformed percent escape, which could reach another route than the one checked; send the path without them.")
		}
		var ok bool
		route, ok = s.router.Match(ci.Method, path)
		if !s.router.Open() {
			// Every reading of the path an upstream might make must reach
			// the route it matches as sent. The case-blind one is cheap
			// and always checked.
			ambiguous := false
			if s.router.CaseMatters(path) {
				r, ok2 := s.router.MatchFold(ci.Method, path)
				ambiguous = ok2 != ok || r.Template != route.Template
			}
			// A server may make several readings at once (nginx merges
			// slashes and decodes %2F before a case-blind application
			// router), so each other reading is matched case-blind too.
			for _, other := range OtherReadings(path) {
				if r, ok2 := s.router.Match(ci.Method, other); ok2 != ok || r.Template != route.Template {
					ambiguous = true
				}
				if s.router.CaseMatters(other) {
					if r, ok2 := s.router.MatchFold(ci.Method, other); ok2 != ok || r.Template != route.Template {
						ambiguous = true
					}
				}
			}
			if ambiguous {
				return Route{}, NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_path",
					"The path reads as another route on servers that decode encoded slashes, merge repeated slashes, drop ;parameters or .suffixes, or ignore case; send it in the form the route expects.")
			}
		}
		if !ok {
			return Route{}, NewAPIError(http.StatusNotFound, TypeInvalidRequest, "route_not_found",
				fmt.Sprintf("No route %s %s.", ci.Method, path))
		}
	}
	if k.Kind == Publishable && route.Write {
		return route, NewAPIError(http.StatusForbidden, TypePermission, "publishable_key_not_allowed",
			"Publishable keys are read-only; use a secret key for this call.")
	}
	for _, want := range route.Scopes {
		if !HasScope(k.Kind, k.Scopes, want) {
			ae := NewAPIError(http.StatusForbidden, TypePermission, "insufficient_scope",
				fmt.Sprintf("This key lacks the %q scope needed for %s %s.", want, ci.Method, route.Template))
			ae.Scope = want
			return route, ae
		}
	}
	return route, nil
}

// refuseWithLimits answers a call by a valid key that its route or
// scopes refuse (refusal): the call takes its token from the key's and the
// account's rate limits, as any call does, so its answer carries their
// headers, and a caller past them gets the 429 instead. The monthly quota
// counts only calls that reach the upstream, so it is neither charged nor
// named.
func (s *Server) refuseWithLimits(ctx context.Context, k *Key, refusal error, setHeader func(name string, value []byte)) error {
	if err := s.limitCall(ctx, k, false, time.Time{}, setHeader); err != nil {
		return err
	}
	return refusal
}

// authorize matches the route and checks the key may call it.
func (s *Server) authorize(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		k := c.Get("key").(*Key)
		req := c.Request()
		route, err := s.authorizeCall(k, CallInfo{Method: req.Method, Path: req.URL.EscapedPath(),
			MethodOverride: methodOverride(req.Header, req.URL.RawQuery, req.Method)}, c.Path() == "/v1/events")
		if route.Template != "" {
			c.Set("route", route)
		}
		if err != nil {
			h := c.Response().Header()
			return s.refuseWithLimits(req.Context(), k, err, func(name string, value []byte) { h[name] = []string{string(value)} })
		}
		return next(c)
	}
}

// methodOverride is what h's method-override headers and the query's
// _method ask for, as PickMethodOverride picks it.
func methodOverride(h http.Header, rawQuery, method string) string {
	var vs []string
	for _, name := range MethodOverrideHeaders {
		vs = append(vs, h.Values(name)...)
	}
	vs = AppendQueryMethodOverrides(vs, rawQuery)
	return PickMethodOverride(method, vs)
}

// MethodOverrideParam is the query parameter Laravel, Symfony and Express's
// method-override('_method') read as the request's real method.
const MethodOverrideParam = "_method"

// AppendQueryMethodOverrides appends the values of rawQuery's _method
// parameters, decoded as frameworks decode them, to vs. PHP also reads a
// name with leading spaces dropped and "." or a space for "_" as the same
// (".method", "+_method"). Most queries have neither "method" nor an
// escape (which could spell it), and are not parsed.
func AppendQueryMethodOverrides(vs []string, rawQuery string) []string {
	if !QueryMayOverrideMethod(rawQuery) {
		return vs
	}
	for part := range strings.SplitSeq(rawQuery, "&") {
		k, v, _ := strings.Cut(part, "=")
		if k != MethodOverrideParam {
			dk, err := url.QueryUnescape(k)
			if err != nil || phpName(dk) != MethodOverrideParam {
				continue
			}
		}
		if dv, err := url.QueryUnescape(v); err == nil {
			v = dv
		}
		vs = append(vs, v)
	}
	return vs
}

// PickMethodOverride returns, of the values of a call's method-override
// headers (every value of each of MethodOverrideHeaders), the first that
// names another method than method, else the first, else "". Frameworks
// differ in which header and which value they read, so any one asking for
// another method has the call refused (CallInfo.MethodOverride).
//
// Empty values are passed over: frameworks read past an empty one (PHP
// keeps the last of repeated query parameters, Symfony falls back from an
// empty header to the query), and one returned here would have read as no
// override at all and let a DELETE behind it through.
func PickMethodOverride(method string, vs []string) string {
	first := ""
	for _, v := range vs {
		t := strings.TrimSpace(v)
		if t == "" {
			continue
		}
		if !strings.EqualFold(t, method) {
			return v
		}
		if first == "" {
			first = v
		}
	}
	return first
}

// QueryMayOverrideMethod reports whether a raw query may hold a _method
// parameter, in any spelling AppendQueryMethodOverrides reads.
func QueryMayOverrideMethod[T ~string | ~[]byte](rawQuery T) bool {
	const name = "method"
	for i := 0; i < len(rawQuery); i++ {
		if rawQuery[i] == '%' {
			return true
		}
		if len(rawQuery)-i >= len(name) {
			j := 0
			for j < len(name) && rawQuery[i+j] == name[j] {
				j++
			}
			if j == len(name) {
				return true
			}
		}
	}
	return false
}

// phpName is a query parameter's name as PHP registers it: cut at a NUL
// (PHP registers the name as a C string: "_method%00x" is _method), leading
// spaces dropped, and "." and " " read as "_".
func phpName(name string) string {
	if i := strings.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	name = strings.TrimLeft(name, " ")
	if !strings.ContainsAny(name, ". ") {
		return name
	}
	return strings.Map(func(r rune) rune {
		if r == '.' || r == ' ' {
			return '_'
		}
		return r
	}, name)
}

// zone is the named time zone for quota months, or UTC (with one warning
// per name) when the name does not load.
func (s *Server) zone(name string) *time.Location {
	if v, ok := s.zones.Load(name); ok {
		if loc, _ := v.(*time.Location); loc != nil {
			return loc
		}
		return time.UTC
	}
	loc, err := caltime.LoadZone(name)
	if err != nil {
		s.log.Warn("account time zone does not load; its quota months follow UTC", "timezone", name, "err", err)
		s.zones.Store(name, (*time.Location)(nil))
		return time.UTC
	}
	s.zones.Store(name, loc)
	return loc
}

// limitNames name CallLimits.Buckets as limit builds them, in order.
var limitNames = [...]string{"key", "account"}

// limitCall applies the key and account rate limits and (when quota is
// true) the monthly quota at now (zero: the clock's now), and writes the
// rate-limit headers.
func (s *Server) limitCall(ctx context.Context, k *Key, quota bool, now time.Time, setHeader func(name string, value []byte)) error {
	if s.deps.Limiter == nil {
		return nil
	}
	lim := s.planLimits(k.Plan)
	names := s.keyLimits.get(s.cfg.RateLimitPrefix, k)
	cl := CallLimits{Buckets: names.buckets, RPS: lim.RequestsPerSecond, Burst: lim.Burst, Slot: &names.slot}
	var end time.Time
	if quota && s.deps.Quota != nil && lim.MonthlyRequests != nil {
		loc := time.UTC
		if s.cfg.QuotaTimezone == "account" && k.AccountTimezone != "" {
			loc = s.zone(k.AccountTimezone)
		}
		if now.IsZero() {
			now = s.now()
		}
		m := names.monthOf(s.cfg.RateLimitPrefix, k, now, loc)
		end = m.end
		cl.QuotaBucket = m.bucket
		cl.QuotaLimit, cl.QuotaTTL = *lim.MonthlyRequests, end.Sub(now)+quotaGrace
	}
	res, err := s.allowCall(ctx, cl)
	if err != nil {
		return err
	}
	// One state per bucket, as limitNames names them, kept on the stack.
	var buf [len(limitNames)]limitState
	states := buf[:len(res.Rates)]
	var refused *limitState
	for i, r := range res.Rates {
		states[i] = limitState{name: limitNames[i], result: r, rps: lim.RequestsPerSecond}
		if !r.Allowed {
			refused = &states[i]
		}
	}
	var qs *quotaState
	if res.QuotaChecked {
		qs = &quotaState{limit: cl.QuotaLimit, used: res.QuotaUsed, reset: end, window: end.Sub(now), resetIn: end.Sub(now)}
		shortly := false           // the share's reset, not the month's
		if res.QuotaShare != nil { // the local fallback: this instance's share, counted here alone
			qs.limit = *res.QuotaShare
			// The share holds until the shared count is asked again, a
			// second or so away (by the limiter's clock): a caller told to
			// come back at the month's end would stop for days over a
			// short outage.
			if d := max(time.Second, time.Until(res.ShareUntil)); !res.ShareUntil.IsZero() && now.Add(d).Before(end) {
				qs.reset, qs.resetIn, shortly = now.Add(d), d, true
			}
		}
		if !res.QuotaAllowed && res.QuotaLeased && now.Add(time.Second).Before(end) {
			// Refused while another instance's lease may still hold spare
			// calls, which go back within moments: told the month's end, a
			// caller that honours Retry-After stopped for days with calls left.
			qs.reset, qs.resetIn, shortly = now.Add(time.Second), time.Second, true
		}
		if !res.QuotaAllowed {
			// The message is built only for a refusal: most calls pass.
			var what string
			if res.QuotaShare != nil {
				what = fmt.Sprintf("This edge's share (%d requests, while the shared limits are unreachable) of the monthly quota of %d requests for plan %q",
					*res.QuotaShare, cl.QuotaLimit, planName(k.Plan))
			} else {
				what = fmt.Sprintf("The monthly quota of %d requests for plan %q", cl.QuotaLimit, planName(k.Plan))
			}
			until := "until " + end.UTC().Format(time.RFC3339)
			switch {
			case shortly && res.QuotaShare != nil:
				until = "for now; the shared limits are asked again shortly"
			case shortly:
				until = "for now; calls held by other edge instances may come back within a second"
			}
			setRateHeaders(setHeader, states, qs)
			s.m.limited.WithLabelValues("monthly").Inc()
			retry := max(1, ceilSeconds(qs.reset.Sub(now)))
			ae := NewAPIError(http.StatusTooManyRequests, TypeRateLimit, "quota_exceeded",
				fmt.Sprintf("%s is used up %s.", what, until))
			ae.Limit, ae.RetryAfter, ae.RetryAt, ae.UpgradeURL = "monthly", &retry, qs.reset.UTC().Format(time.RFC3339Nano), s.upgradeURL(k.Plan)
			setHeader("Retry-After", strconv.AppendInt(nil, retry, 10))
			return ae
		}
	}
	setRateHeaders(setHeader, states, qs)
	if refused != nil {
		s.m.limited.WithLabelValues(refused.name).Inc()
		retry := max(1, ceilSeconds(refused.result.RetryAfter))
		at := s.now().Add(refused.result.RetryAfter).UTC().Format(time.RFC3339Nano)
		msg := fmt.Sprintf("Too many requests for this %s: %d per second (burst %d) on plan %q.",
			refused.name, lim.RequestsPerSecond, lim.Burst, planName(k.Plan))
		if refused.result.Limit != lim.Burst {
			// Decided by this edge alone (the local fallback): its share,
			// which the headers carry, is what refused the call.
			msg += fmt.Sprintf(" While the shared limits are unreachable, this edge allows its share: a burst of %d.", refused.result.Limit)
		}
		ae := NewAPIError(http.StatusTooManyRequests, TypeRateLimit, "rate_limited", msg)
		ae.Limit, ae.RetryAfter, ae.RetryAt, ae.UpgradeURL = refused.name, &retry, at, s.upgradeURL(k.Plan)
		setHeader("Retry-After", strconv.AppendInt(nil, retry, 10))
		return ae
	}
	return nil
}

// limit is limitCall as echo middleware.
func (s *Server) limit(quota bool) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			// An upgrade takes its upgraded connection first, so a call
			// refused for want of one costs no quota (as with Admit).
			var closed func()
			if quota && IsUpgrade(c.Request().Header) {
				var err error
				if closed, err = s.UpgradeOpened(); err != nil {
					return err
				}
				c.Set(upgradeSlot, closed)
			}
			h := c.Response().Header()
			if err := s.limitCall(c.Request().Context(), c.Get("key").(*Key), quota, time.Time{}, func(name string, value []byte) { h[name] = []string{string(value)} }); err != nil {
				if closed != nil {
					closed()
				}
				return err
			}
			return next(c)
		}
	}
}

// planLimits are the limits of plan: those of its plans-table row, with
// what the row leaves out taken from edge.plans for the plan's id (the
// free plan's when edge.plans has no such plan). A row without rate limits
// takes edge.plans' rate and burst but keeps its own monthly quota; a row
// with no limits at all takes edge.plans' whole, quota included.
func (s *Server) planLimits(p Plan) Limits {
	lim := s.planLimitsAsStored(p)
	if lim.MonthlyRequests != nil && *lim.MonthlyRequests < 0 {
		// A plan row written by hand with a negative quota (edge.plans
		// refuses one; the invoicer reads the row as it is): no quota, as
		// Redis would count it, not a quota whose headers say that nothing
		// is left.
		lim.MonthlyRequests = nil
	}
	return lim
}

// planLimitsAsStored is planLimits before a negative quota is dropped: a
// plan's limits, with the rate and burst it leaves out taken from its
// edge.plans entry, else the free tier's.
func (s *Server) planLimitsAsStored(p Plan) Limits {
	lim := p.Limits
	if lim.RequestsPerSecond > 0 && lim.Burst > 0 {
		return lim
	}
	fb, ok := s.cfg.Plans[p.ID]
	if !ok {
		fb = s.cfg.Plans["free"]
	}
	if lim.RequestsPerSecond <= 0 && lim.Burst <= 0 && lim.MonthlyRequests == nil {
		return fb.Limits
	}
	if lim.RequestsPerSecond <= 0 {
		lim.RequestsPerSecond = fb.Limits.RequestsPerSecond
	}
	if lim.Burst <= 0 {
		lim.Burst = fb.Limits.Burst
	}
	return lim
}

func planName(p Plan) string {
	if p.ID == "" {
		return "free"
	}
	return p.ID
}

// upgradeURL is where a caller limited under plan p can buy more: the
// plan's own link, else its edge.plans entry's, else the free tier's (as
// planLimits falls back), so a plan stored without one still points
// somewhere.
func (s *Server) upgradeURL(p Plan) string {
	if p.UpgradeURL != "" {
		return p.UpgradeURL
	}
	if u := s.cfg.Plans[planName(p)].UpgradeURL; u != "" {
		return u
	}
	return s.cfg.Plans["free"].UpgradeURL
}

func (s *Server) newProxy(upstream string) (*httputil.ReverseProxy, error) {
	u, err := url.Parse(upstream)
	if err != nil {
		return nil, fmt.Errorf("parse upstream %q: %w", upstream, err)
	}
	tlsCfg, err := s.cfg.UpstreamTLS()
	if err != nil {
		return nil, err
	}
	transport := &http.Transport{
		TLSClientConfig:     tlsCfg,
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: s.cfg.UpstreamDialTimeout(), KeepAlive: 30 * time.Second, Resolver: s.cfg.upstreamResolver}).DialContext,
		MaxIdleConns:        s.cfg.UpstreamMaxConns,
		MaxIdleConnsPerHost: s.cfg.UpstreamMaxConns,
		MaxConnsPerHost:     s.cfg.UpstreamMaxConns,
		IdleConnTimeout:     s.cfg.UpstreamIdleTimeout,
		// The fasthttp front's bound on an answer's head: a larger one
		// is a 502, not relayed.
		MaxResponseHeaderBytes: 16 << 10,
	}
	return &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
			// Request trailers are not forwarded: they arrive after the
			// headers have been checked, and could carry the key or
			// forged identity headers past those checks.
			r.Out.Trailer = nil
			r.Out.Header.Del("Authorization")
			r.Out.Header.Set(HeaderRequestID, r.In.Header.Get(HeaderRequestID))
			for name := range r.Out.Header {
				if IsIdentityHeader(name) || IsForwardingAlias(name) || IsRewriteHeader(name) {
					delete(r.Out.Header, name) // the caller's, forged or not
				}
			}
			if pc, ok := r.In.Context().Value(proxiedCallKey{}).(*proxiedCall); ok {
				id := IdentityOf(pc.key)
				r.Out.Header[HeaderAccount] = []string{id.Account}
				r.Out.Header[HeaderEnvironment] = []string{id.Environment}
				r.Out.Header[HeaderKeyID] = []string{id.KeyID}
				r.Out.Header[HeaderPlan] = []string{id.Plan}
				r.Out.Header[HeaderScopes] = []string{string(id.AppendScopes(nil))}
			}
			// ReverseProxy drops the caller's X-Forwarded-For before
			// Rewrite; the edge appends to it, as the fasthttp front does.
			r.Out.Header["X-Forwarded-For"] = r.In.Header["X-Forwarded-For"]
			r.SetXForwarded()
		},
		Transport:  connNamedTransport{transport},
		BufferPool: s.buffers,
		ModifyResponse: func(r *http.Response) error {
			if r.StatusCode < 100 || r.StatusCode > 999 {
				// Not an HTTP status: writing it would panic in net/http
				// (000) or make an invalid status line. The error handler
				// answers 502.
				return fmt.Errorf("the upstream answered status %d, which is not an HTTP status", r.StatusCode)
			}
			for name := range r.Header {
				if s.cors != nil && IsCORSHeader(name) || IsEdgeHeader(name) {
					delete(r.Header, name) // the edge's own stand
				}
			}
			if r.StatusCode == http.StatusSwitchingProtocols {
				dropSwitchHopByHop(r.Header)
				// net/http then requires the switch to be to the
				// caller's whole Upgrade value; a caller may list
				// several, or give a version the upstream leaves out.
				got := r.Header.Values("Upgrade")
				if len(got) != 1 {
					return fmt.Errorf("the upstream's 101 names %d protocols", len(got))
				}
				if UpgradeAsked(r.Request.Header.Get("Upgrade"), got[0]) {
					r.Request.Header.Set("Upgrade", got[0])
				}
			}
			// Trailers follow the body unannounced (touchingBody filters
			// them when it ends): announced, net/http would send the
			// head's values under a trailer's name (the edge's own Vary:
			// Origin among them) again in the trailer.
			clear(r.Trailer)
			pc, ok := r.Request.Context().Value(proxiedCallKey{}).(*proxiedCall)
			if !ok {
				return nil
			}
			if r.StatusCode == http.StatusSwitchingProtocols {
				pc.watch.Stop() // the handshake is done: the tunnel has its own idle timeout
				return nil
			}
			pc.watch.Touch()
			r.Body = touchingBody{ReadCloser: r.Body, watch: pc.watch, resp: r, cors: s.cors != nil}
			if HoldsAnswer(r.ContentLength) && pc.release == nil { // a held upload holds its answer too
				s.holdCall(pc, "long answer cut", r.Request.Header.Get(HeaderRequestID))
			}
			return nil
		},
		// Responses of unknown length (and event streams) are flushed on
		// every write by ReverseProxy itself. For a response with a length,
		// flushing each write (-1) cost a goroutine and an extra write
		// syscall per call; 10 ms still passes a trickling body on promptly.
		FlushInterval: 10 * time.Millisecond,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(context.Cause(r.Context()), ErrKeyEnded) {
				// A held upload whose key ended (HoldsUpload): the rest of
				// the body is not read, so the connection goes after this
				// answer (the hold's end already ended the read waiting on
				// the caller: proxiedCall.stopReading).
				w.Header().Set("Connection", "close")
				writeAPIError(w, KeyEnded())
				return
			}
			ae := NewAPIError(http.StatusBadGateway, TypeAPI, "upstream_unavailable", "The upstream service could not be reached.")
			// A dial that times out reports it either way: as a
			// context.DeadlineExceeded or as the poller's deadline error.
			var ne net.Error
			timedOut := errors.Is(err, context.DeadlineExceeded) || errors.Is(context.Cause(r.Context()), context.DeadlineExceeded) ||
				errors.As(err, &ne) && ne.Timeout()
			if timedOut {
				ae = NewAPIError(http.StatusGatewayTimeout, TypeAPI, "upstream_timeout", "The upstream service did not answer in time.")
				if pc, ok := r.Context().Value(proxiedCallKey{}).(*proxiedCall); ok && !pc.connecting.Load() {
					ae = UpstreamBusy() // it waited for a connection all along
				}
			}
			if !timedOut && errors.Is(err, context.Canceled) && r.Context().Err() != nil {
				s.log.Debug("client went away", "err", err)
			} else {
				s.log.Warn("upstream error", "status", ae.Status, "err", err)
			}
			writeAPIError(w, ae)
		},
	}, nil
}

func writeAPIError(w http.ResponseWriter, ae *APIError) {
	ae.RequestID = w.Header().Get(HeaderRequestID)
	ae.SetHeaders(w.Header().Get, w.Header().Set)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(ae.Status)
	_ = json.NewEncoder(w).Encode(map[string]*APIError{"error": ae})
}

// countingBody counts the caller's body as it goes up, and marks the
// call's upstream_timeout watch as it does.
type countingBody struct {
	io.ReadCloser
	n     int64
	watch *IdleWatch
	eof   atomic.Bool // the whole body was read
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	if err == io.EOF {
		b.eof.Store(true)
	}
	if n > 0 && b.watch != nil {
		b.watch.Touch()
	}
	return n, err
}

func (s *Server) proxy(c echo.Context) error {
	k := c.Get("key").(*Key)
	route := c.Get("route").(Route)
	req := c.Request()
	start := s.now()
	body := &countingBody{ReadCloser: req.Body}
	req.Body = body
	p := s.live
	if k.Environment == schemas.Test {
		p = s.sandbox
	}
	resp := c.Response()
	req.Header.Set(HeaderRequestID, resp.Header().Get(HeaderRequestID))
	// upstream_timeout bounds each silence of the upstream, not the whole
	// exchange (as nginx's proxy_read_timeout does): the watch is touched
	// as the caller's body goes up and the answer's body comes back, and
	// ends the call's context when neither moved for that long. For an
	// upgrade it bounds the handshake alone: net/http's proxy closes the
	// upstream side of a tunnel when the context ends, so ModifyResponse
	// stops the watch when the upstream switches.
	//
	// A caller who hangs up does not end an ordinary call: the upstream's
	// work runs to its answer, which is metered, as on the fasthttp front
	// (cut short, the upstream may have done part of a write, and the
	// call was metered 502 as if the upstream had failed).
	base := req.Context()
	if !IsUpgrade(req.Header) {
		base = context.WithoutCancel(base)
	}
	ctx, cancel := context.WithCancelCause(base)
	defer cancel(nil)
	epoch, _ := c.Get(keyEpochCtx).(uint64)
	pc := &proxiedCall{key: k, epoch: epoch, body: body}
	pc.cancel = func(cause error) { cancel(cause); pc.stopReading() }
	if req.ContentLength != 0 && !IsUpgrade(req.Header) {
		pc.caller = http.NewResponseController(resp)
	}
	defer pc.done()
	watch := NewIdleWatch(s.cfg.UpstreamTimeout, func() { pc.cancel(context.DeadlineExceeded) })
	defer watch.Stop()
	body.watch, pc.watch = watch, watch
	ctx = context.WithValue(ctx, proxiedCallKey{}, pc)
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		// A dial starts with the name's lookup, if the upstream is named
		// by one: a slow lookup is the upstream's timeout, not a full pool.
		DNSStart:     func(httptrace.DNSStartInfo) { pc.connecting.Store(true) },
		ConnectStart: func(string, string) { pc.connecting.Store(true) },
		GotConn:      func(httptrace.GotConnInfo) { pc.connecting.Store(true) },
	})
	defer func() {
		if pc.release != nil {
			pc.release()
		}
	}()
	if !IsUpgrade(req.Header) && HoldsUpload(req.ContentLength) {
		s.holdCall(pc, "upload cut", resp.Header().Get(HeaderRequestID))
	}
	if !IsUpgrade(req.Header) {
		// Deferred, so the call is metered even when net/http's proxy
		// aborts it: when a body breaks off after the answer's head went
		// out, it panics with http.ErrAbortHandler.
		defer func() {
			s.EmitCall(Call{Key: k, Route: route, ID: c.Get("event_id").(uuid.UUID), Method: req.Method, Status: resp.Status,
				Start: start, RequestBytes: body.n, ResponseBytes: resp.Size, RequestID: resp.Header().Get(HeaderRequestID)})
		}()
		p.ServeHTTP(&informational{Response: resp}, req.WithContext(ctx))
		return nil
	}
	closed, ok := c.Get(upgradeSlot).(func()) // taken by limit before the quota
	if !ok {
		var err error
		if closed, err = s.UpgradeOpened(); err != nil {
			return err
		}
	}
	// net/http's proxy returns when an upgraded connection closes.
	defer closed()
	w := &upgradeWriter{ResponseWriter: &informational{Response: resp}, idle: s.cfg.UpgradedIdleTimeout,
		hold: func(end func()) func() { return s.HoldKey(k, epoch, end) }}
	defer func() {
		if !w.switched.IsZero() {
			c.Set(handshakeEnd, w.switched)
		}
		status := resp.Status
		fromCaller, toCaller := w.tunnelled()
		if !resp.Committed {
			// A switched protocol is written on the hijacked connection,
			// past the response writer.
			status = http.StatusSwitchingProtocols
		}
		s.EmitCall(Call{Key: k, Route: route, ID: c.Get("event_id").(uuid.UUID), Method: req.Method, Status: status,
			Start: start, RequestBytes: body.n + fromCaller, ResponseBytes: resp.Size + toCaller, RequestID: resp.Header().Get(HeaderRequestID)})
	}()
	p.ServeHTTP(w, req.WithContext(ctx))
	return nil
}

// informational is the caller's response writer as net/http's proxy gets
// it: an informational answer (100 Continue, 103 Early Hints), which that
// proxy passes on before the final one, goes straight to the connection.
// Through echo's Response it would be taken for the call's status, and the
// final status dropped as written twice.
//
// The proxy writes an informational answer with the header map as it
// stands (the edge's own headers in it) and then empties the map, so the
// edge's headers (Request-Id, the rate-limit and CORS headers, Vary) are
// kept aside at the first one and put back on the final answer, which
// would otherwise go without them.
type informational struct {
	*echo.Response
	edge http.Header
}

func (w *informational) WriteHeader(code int) {
	h := w.Response.Header()
	if code >= 100 && code < 200 && code != http.StatusSwitchingProtocols {
		if w.edge == nil {
			w.edge = http.Header{}
			for name, vs := range h {
				if IsEdgeHeader(name) || IsCORSHeader(name) || name == "Vary" {
					w.edge[name] = slices.Clone(vs)
				}
			}
		}
		w.Response.Writer.WriteHeader(code)
		return
	}
	for name, vs := range w.edge {
		if name != "Vary" {
			if _, set := h[name]; !set {
				h[name] = vs
			}
			continue
		}
		for _, v := range vs {
			if !slices.Contains(h["Vary"], v) {
				h["Vary"] = append(h["Vary"], v)
			}
		}
	}
	w.Response.WriteHeader(code)
}

func (w *informational) Unwrap() http.ResponseWriter { return w.Response }

// handshakeEnd is the echo context key of when an upgraded call's
// handshake ended, for the request-duration histogram.
const handshakeEnd = "handshake_end"

// proxiedCall is what net/http's proxy needs of a call, read from its
// context (one value for all of it): the key it was admitted with, the key
// store's invalidation count read before that key was looked up, its
// upstream_timeout watch, and how to end it.
type proxiedCall struct {
	key    *Key
	epoch  uint64
	watch  *IdleWatch
	cancel context.CancelCauseFunc
	// release forgets the hold the call is under, once holdCall took
	// one.
	release func()
	// caller, for a call with a body, ends a read of it that waits for
	// bytes (stopReading): when the call's context ends (its key ended,
	// upstream_timeout), net/http's transport waits for its body writer,
	// blocked in that read, before it gives up, so a caller that stopped
	// sending would hold the call, unanswered, until it sent again. mu and
	// over order that with the handler's return, so that the next call on
	// the connection never finds the deadline.
	caller *http.ResponseController
	body   *countingBody
	mu     sync.Mutex
	over   bool
	// connecting is set once the call began to dial the upstream (its
	// name's lookup included) or was given a connection: a call that times out without it waited for a free
	// one (edge.upstream_max_conns).
	connecting atomic.Bool
}

// stopReading ends a read of the caller's body that waits for bytes,
// unless the body was read whole or the call is over.
func (pc *proxiedCall) stopReading() {
	if pc.caller == nil || pc.body.eof.Load() {
		return
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if !pc.over {
		_ = pc.caller.SetReadDeadline(time.Now())
	}
}

// done marks the call over for stopReading.
func (pc *proxiedCall) done() {
	pc.mu.Lock()
	pc.over = true
	pc.mu.Unlock()
}

// proxiedCallKey is the context key of a call's proxiedCall.
type proxiedCallKey struct{}

// holdCall holds a call under its key: one with a streamed or long upload
// (HoldsUpload) from its admission, one with a long answer (HoldsAnswer;
// an upgrade's too when the upstream declines it) from the answer's head.
// Once the key is no longer usable, the call's context ends, which cuts
// the upload, the wait for the answer, or the answer where it is; what is
// logged says which (what).
func (s *Server) holdCall(pc *proxiedCall, what, rid string) {
	pc.release = s.HoldKey(pc.key, pc.epoch, func() {
		s.log.Info(what+": its API key is no longer usable", "key_id", pc.key.ID, "request_id", rid)
		pc.cancel(ErrKeyEnded)
	})
}

// UpgradeAllowed reports whether a call's Upgrade header (one protocol or
// a list) names only protocols edge.upgrade_protocols allows, each with or
// without a version ("websocket", "websocket/13").
func (s *Server) UpgradeAllowed(upgrade string) bool {
	named := false
	for _, p := range strings.Split(upgrade, ",") {
		name, _, _ := strings.Cut(strings.TrimSpace(p), "/")
		if name == "" {
			continue
		}
		if !slices.ContainsFunc(s.cfg.UpgradeProtocols, func(a string) bool { return strings.EqualFold(a, name) }) {
			return false
		}
		named = true
	}
	return named
}

// dropUpgrade makes a call that asks to switch to a protocol the edge does
// not carry an ordinary one: its Upgrade header goes, and "upgrade" from
// its Connection options.
func dropUpgrade(h http.Header) {
	h.Del("Upgrade")
	var kept []string
	for _, v := range h.Values("Connection") {
		for _, opt := range strings.Split(v, ",") {
			if opt = strings.TrimSpace(opt); opt != "" && !strings.EqualFold(opt, "upgrade") {
				kept = append(kept, opt)
			}
		}
	}
	h.Del("Connection")
	if len(kept) > 0 {
		h.Set("Connection", strings.Join(kept, ", "))
	}
}

// IsUpgrade reports whether h asks to switch protocols: an Upgrade header
// and the upgrade token in Connection (RFC 9110, 7.8), as net/http's proxy
// and the fasthttp front read it. An Upgrade header alone asks for nothing
// and is a plain call.
func IsUpgrade(h http.Header) bool {
	if h.Get("Upgrade") == "" {
		return false
	}
	for _, v := range h.Values("Connection") {
		for _, opt := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(opt), "upgrade") {
				return true
			}
		}
	}
	return false
}

// touchingBody marks its call's watch whenever bytes of the upstream's
// answer come.
type touchingBody struct {
	io.ReadCloser
	watch *IdleWatch
	// resp's trailers, filled in when its body ends, are those the
	// caller gets after the body (KeepsResponseTrailer): ReverseProxy
	// passes on what resp.Trailer holds then, announced or not.
	resp *http.Response
	cors bool
}

func (b touchingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.watch.Touch()
	}
	if err == io.EOF {
		keepTrailers(b.resp.Trailer, b.cors)
	}
	return n, err
}

// connNamedTransport keeps from the caller the trailers an answer's
// Connection header names: they describe the upstream's connection, in
// the trailer as in the head. ReverseProxy drops the named fields from the
// head, but the trailers come after it has dropped the Connection header
// too, so the names are taken here, as the answer arrives.
type connNamedTransport struct{ http.RoundTripper }

func (t connNamedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	res, err := t.RoundTripper.RoundTrip(r)
	if err != nil || len(res.Header["Connection"]) == 0 || res.StatusCode == http.StatusSwitchingProtocols {
		return res, err // a tunnel's body is its connection, left as it is
	}
	var named []string
	for _, line := range res.Header["Connection"] {
		for name := range strings.SplitSeq(line, ",") {
			// close names no field, and the hop-by-hop fields (Keep-Alive,
			// Upgrade, …) never pass as trailers anyway
			// (KeepsResponseTrailer): an upstream that sends "Connection:
			// Upgrade" on every answer costs nothing here.
			if name = textproto.TrimString(name); name != "" && !strings.EqualFold(name, "close") && KeepsResponseTrailer(name, false) {
				named = append(named, name)
			}
		}
	}
	if len(named) > 0 {
		res.Body = connNamedBody{ReadCloser: res.Body, res: res, named: named}
	}
	return res, nil
}

// connNamedBody drops its answer's trailers named in named when it ends.
type connNamedBody struct {
	io.ReadCloser
	res   *http.Response
	named []string
}

func (b connNamedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		for name := range b.res.Trailer {
			if slices.ContainsFunc(b.named, func(n string) bool { return strings.EqualFold(n, name) }) {
				delete(b.res.Trailer, name)
			}
		}
	}
	return n, err
}

// keepTrailers drops the response trailers the caller does not get.
func keepTrailers(t http.Header, cors bool) {
	for name := range t {
		if !KeepsResponseTrailer(name, cors) {
			delete(t, name)
		}
	}
}

// EventRoute is a route template as a call's event can carry it: valid
// UTF-8, each byte that is not part of a character written %XX, and at
// most schemas.MaxRouteLength bytes, cut between characters. Ingest
// refuses an event whose route is longer, and reads invalid bytes as
// U+FFFD (3 bytes each), so a path of raw bytes the edge served, taken as
// it was sent, made an event that was dead-lettered, never billed.
func EventRoute(t string) string {
	if len(t) <= schemas.MaxRouteLength && utf8.ValidString(t) {
		return t
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, min(len(t), schemas.MaxRouteLength))
	for i := 0; i < len(t); {
		r, size := utf8.DecodeRuneInString(t[i:])
		piece := t[i : i+size]
		if r == utf8.RuneError && size == 1 {
			piece = string([]byte{'%', hex[t[i]>>4], hex[t[i]&15]})
		}
		if len(b)+len(piece) > schemas.MaxRouteLength {
			break
		}
		b = append(b, piece...)
		i += size
	}
	return string(b)
}

// Call is a proxied call, for its usage event.
type Call struct {
	Key    *Key
	Route  Route
	ID     uuid.UUID
	Method string
	Status int
	Start  time.Time
	// End is when the answer ended, by the server's clock; zero is now.
	End                         time.Time
	RequestBytes, ResponseBytes int64
	RequestID                   string
}

func (c Call) end(now func() time.Time) time.Time {
	if c.End.IsZero() {
		return now()
	}
	return c.End
}

// EmitCall emits a proxied call's usage event; its latency runs from
// c.Start to c.End (zero: now).
func (s *Server) EmitCall(c Call) {
	status := c.Status
	if status < 100 || status > 599 {
		status = 0 // no HTTP status (an upstream's 999): metered without one
	}
	ev := schemas.Event{
		Version:       schemas.EventVersion,
		ID:            c.ID,
		AccountID:     c.Key.AccountID,
		Environment:   c.Key.Environment,
		KeyID:         c.Key.ID,
		Type:          s.cfg.EventType,
		Time:          c.Start,
		Route:         EventRoute(c.Route.Template),
		Method:        c.Method,
		Status:        status,
		LatencyMicros: c.end(s.now).Sub(c.Start).Microseconds(),
		RequestBytes:  c.RequestBytes,
		ResponseBytes: c.ResponseBytes,
		Units:         1,
		RequestID:     c.RequestID,
	}
	ev.Normalize()
	s.deps.Emitter.Emit(ev)
}
