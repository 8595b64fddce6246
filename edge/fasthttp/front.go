// Package fasthttp serves the edge on fasthttp: proxied calls are decided
// and forwarded without net/http, and the edge's few other routes
// (/healthz, /readyz, POST /v1/events) go to the edge's own net/http
// handler through fasthttp's adaptor.
//
// Connection upgrades (WebSocket) are proxied here too, on a connection
// to the upstream of their own (upgrade.go).
//
// Why: on Go's net/http, a reverse proxy with none of the edge's work
// spends about three times nginx's CPU per call (docs/edge.md, Benchmark),
// much of it in the client's per-connection goroutines and the
// allocations of each request and response. fasthttp reuses its request,
// response and connection state and runs a call on one goroutine.
package fasthttp

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	fh "github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/deadline"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Front is the edge's HTTP server.
type Front struct {
	s       *edge.Server
	log     *slog.Logger
	slow    fh.RequestHandler
	live    *upstream
	sandbox *upstream
	timeout time.Duration
	// cors is nil unless edge.cors allows some origin.
	cors *edge.CORS
	// tls serves HTTPS when edge.tls_cert_file is set; nil: plain HTTP.
	tls *tls.Config
	// idle closes a tunnel that carried nothing for this long.
	idle    time.Duration
	srv     *fh.Server
	tunnels tunnels
	// short lends the buffers short answers are read into (see proxy).
	short sync.Pool
	// stopping is set when a graceful stop runs out of time, or Close
	// begins: a call that comes after it (on a connection fasthttp let go
	// back to keep-alive when its wait ended) is refused, not admitted and
	// charged, then lost with the process. Calls during the graceful wait
	// are served, with Connection: close, as fasthttp serves them.
	stopping atomic.Bool
	// callers are the callers' open connections, for Close to cut.
	callers connSet
}

// connSet is a set of open connections.
type connSet struct {
	mu sync.Mutex
	m  map[*callerConn]struct{}
}

func (s *connSet) add(c *callerConn) {
	s.mu.Lock()
	if s.m == nil {
		s.m = map[*callerConn]struct{}{}
	}
	s.m[c] = struct{}{}
	s.mu.Unlock()
}

func (s *connSet) remove(c *callerConn) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

func (s *connSet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// closeAll closes every connection in the set.
func (s *connSet) closeAll() {
	s.mu.Lock()
	conns := make([]*callerConn, 0, len(s.m))
	for c := range s.m {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.Conn.Close() // not c.Close: no lingering read on the way out
	}
}

// upstream is one upstream base URL and its connection pool.
type upstream struct {
	hc *fh.HostClient
	// serverName is the upstream's host name, for TLS on an upgrade's own
	// connection.
	serverName string
	// tls is how an https upstream is spoken to (edge.upstream_ca_file).
	tls *tls.Config
	// dial bounds opening a connection to it (Config.UpstreamDialTimeout).
	dialTimeout time.Duration
	// host is the upstream URL's host[:port], the Host of a call that
	// came without one.
	host string
	// base is the base URL's path, without a trailing slash, put before
	// every proxied path (as net/http's ReverseProxy joins them).
	base string
}

// maxHeaderBytes bounds a request's or response's header block.
const maxHeaderBytes = 16 << 10

// New serves s.
func New(s *edge.Server, log *slog.Logger) (*Front, error) {
	cfg := s.Config()
	f := &Front{s: s, log: log, slow: fasthttpadaptor.NewFastHTTPHandler(s), timeout: cfg.UpstreamTimeout,
		idle: cfg.UpgradedIdleTimeout, cors: s.CORS()}
	tlsCfg, err := cfg.UpstreamTLS()
	if err != nil {
		return nil, err
	}
	if f.tls, err = cfg.ServerTLS(); err != nil {
		return nil, err
	}
	if f.live, err = newUpstream(cfg.Upstream, cfg.UpstreamTimeout, cfg.UpstreamDialTimeout(), cfg.UpstreamIdleTimeout, cfg.UpstreamMaxConns, tlsCfg); err != nil {
		return nil, err
	}
	// Test-mode calls have a pool of their own even when they go to the
	// live upstream (no edge.sandbox_upstream): in one pool, a test key (a
	// publishable one is public) could take every connection from live
	// traffic.
	sandbox := cfg.SandboxUpstream
	if sandbox == "" {
		sandbox = cfg.Upstream
	}
	if f.sandbox, err = newUpstream(sandbox, cfg.UpstreamTimeout, cfg.UpstreamDialTimeout(), cfg.UpstreamIdleTimeout, cfg.UpstreamMaxConns, tlsCfg); err != nil {
		return nil, err
	}
	f.srv = &fh.Server{
		Handler:               f.handle,
		NoDefaultServerHeader: true,
		NoDefaultContentType:  true,
		// Bodies are the upstream's to parse; the front only streams them.
		DisablePreParseMultipartForm: true,
		StreamRequestBody:            true,
		ReadBufferSize:               maxHeaderBytes,
		// A request's header must arrive within ReadTimeout, as net/http's
		// ReadHeaderTimeout. Its body must keep coming: it may start
		// upstream_timeout later, and each read of a streamed body may wait
		// that long again (proxy), as each read from the upstream may.
		ReadTimeout: 10 * time.Second,
		HeaderReceived: func(*fh.RequestHeader) fh.RequestConfig {
			return fh.RequestConfig{ReadTimeout: cfg.UpstreamTimeout}
		},
		IdleTimeout:     120 * time.Second,
		CloseOnShutdown: true,
		// An upgraded connection is the tunnel's to close: closing it must
		// end a read blocked on it when a stop cuts the tunnel.
		KeepHijackedConns: true,
		ErrorHandler:      f.requestError,
		Logger:            printfLogger{log},
		// An error about a request it could not parse quotes no header
		// bytes (the caller's key among them) in the log.
		SecureErrorLogMessage: true,
	}
	return f, nil
}

func newUpstream(raw string, timeout, dial, idle time.Duration, maxConns int, tlsCfg *tls.Config) (*upstream, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parse upstream %q: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("upstream %q: want http://host[:port][/path] or https://…", raw)
	}
	addr := u.Host
	if u.Port() == "" {
		port := "80"
		if u.Scheme == "https" {
			port = "443"
		}
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	tlsCfg = tlsCfg.Clone()
	tlsCfg.ServerName = u.Hostname()
	return &upstream{
		tls:         tlsCfg,
		dialTimeout: dial,
		serverName:  u.Hostname(),
		host:        u.Host,
		base:        strings.TrimSuffix(u.EscapedPath(), "/"),
		hc: &fh.HostClient{
			Addr:      addr,
			IsTLS:     u.Scheme == "https",
			TLSConfig: tlsCfg,
			// upstream_timeout bounds each silence of the upstream, not the
			// whole exchange: see silentConn.
			Dial: func(addr string) (net.Conn, error) {
				c, err := fh.DialTimeout(addr, dial)
				if err != nil {
					return nil, err
				}
				return &silentConn{Conn: c, limit: timeout}, nil
			},
			// A call that finds every connection busy waits for one up
			// to upstream_timeout, then gets a 503 (upstreamError).
			MaxConns:           maxConns,
			MaxConnWaitTimeout: timeout,
			// fasthttp never sends a call again: proxy decides, knowing
			// the route (sendAgain). Left to fasthttp, a call without a
			// body, a POST included, was sent up to five times to an
			// upstream that closed the connection after running it.
			RetryIfErr: func(*fh.Request, int, error) (bool, bool) { return false, false },
			// fasthttp does not notice an upstream close an idle
			// connection; closing it first keeps calls off dead ones
			// (edge.upstream_idle_timeout).
			MaxIdleConnDuration:      idle,
			ReadBufferSize:           maxHeaderBytes,
			StreamResponseBody:       true,
			DisablePathNormalizing:   true,
			NoDefaultUserAgentHeader: true,
			SecureErrorLogMessage:    true,
		},
	}, nil
}

// Serve serves calls on ln until Shutdown, over TLS when edge.tls_cert_file
// is set.
func (f *Front) Serve(ln net.Listener) error {
	ln = deadline.Listener{Listener: ln} // fasthttp moves the read deadline three times a call
	ln = callerListener{Listener: ln, limit: f.timeout, conns: &f.callers}
	if f.tls != nil {
		ln = tls.NewListener(ln, f.tls)
	}
	return f.srv.Serve(ln)
}

// Shutdown stops accepting calls and waits for those in flight until ctx
// ends. Upgraded connections have no end in sight, so they are cut once
// the other calls are done, and metered.
func (f *Front) Shutdown(ctx context.Context) error {
	// Set as the wait runs out, before fasthttp lets busy connections go
	// back to keep-alive on its return.
	stop := context.AfterFunc(ctx, func() { f.stopping.Store(true) })
	err := f.srv.ShutdownWithContext(ctx)
	stop()
	if err != nil {
		f.stopping.Store(true)
	}
	return errors.Join(err, f.tunnels.closeAll(ctx))
}

// Close stops at once, cutting calls in flight: every caller's connection
// is closed, and Close waits up to closeWait for the calls on them to end
// (a call whose answer can no longer be written ends, and is metered, at
// once; one still waiting for its upstream's answer ends when that comes,
// up to upstream_timeout). It returns how many connections were still
// being served then: their calls' events are lost if the process exits.
func (f *Front) Close() (unfinished int, err error) {
	f.stopping.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = f.srv.ShutdownWithContext(ctx)
	f.callers.closeAll()
	// Cut tunnels are metered within moments; the bound is for one whose
	// hijack never began.
	wait, stop := context.WithTimeout(context.Background(), closeWait)
	defer stop()
	err = errors.Join(err, f.tunnels.closeAll(wait))
	// A connection leaves the set when fasthttp closes it, once the call
	// on it has ended.
	for f.callers.len() > 0 && wait.Err() == nil {
		select {
		case <-wait.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	return f.callers.len(), err
}

// closeWait bounds Close's wait for the calls it cut.
const closeWait = 5 * time.Second

// method is m as a string, without an allocation for the usual methods.
func method(m []byte) string {
	switch string(m) {
	case fh.MethodGet:
		return fh.MethodGet
	case fh.MethodPost:
		return fh.MethodPost
	case fh.MethodPut:
		return fh.MethodPut
	case fh.MethodPatch:
		return fh.MethodPatch
	case fh.MethodDelete:
		return fh.MethodDelete
	case fh.MethodHead:
		return fh.MethodHead
	case fh.MethodOptions:
		return fh.MethodOptions
	}
	return string(m)
}

// slowPath reports whether a call goes to the edge's net/http handler.
func slowPath(method, path []byte) bool {
	switch string(path) {
	case "/healthz", "/readyz":
		return string(method) == fh.MethodGet
	case "/v1/events":
		return string(method) == fh.MethodPost
	}
	return false
}

func (f *Front) handle(ctx *fh.RequestCtx) {
	// The path as sent, as the edge's handler routes it: fasthttp's
	// decoded one sent //v1/events and /v1/%65vents, calls the handler
	// proxies, down the slow path, which reads a body into memory (one
	// over 8 MiB refused) or, for a caller that may not report events,
	// drops it.
	if f.stopping.Load() {
		// A graceful stop has run out of time, or Close has begun: the
		// call is refused before admission, so it is neither charged nor
		// lost with the process.
		_, rid := edge.NewRequestID()
		ctx.Response.Header.Set(edge.HeaderRequestID, rid)
		ctx.Response.Header.Set("Retry-After", "1")
		ctx.SetConnectionClose()
		f.fail(ctx, errShuttingDown(), rid)
		lingerOn(ctx) // an upload refused unread must not reset the answer away
		return
	}
	if slowPath(ctx.Method(), ctx.URI().PathOriginal()) {
		f.slowCall(ctx)
		return
	}
	// One clock read for the call's arrival: its admission (key expiry,
	// quota month), its event's time and its latency all start here.
	start := f.s.Now()
	id, rid := edge.NewRequestID()
	ctx.Response.Header.Set(edge.HeaderRequestID, rid)
	if f.cors != nil {
		origin := string(ctx.Request.Header.Peek("Origin"))
		set := func(name, value string) { ctx.Response.Header.Set(name, value) }
		if method := string(ctx.Request.Header.Peek("Access-Control-Request-Method")); edge.IsPreflight(string(ctx.Method()), origin, method) {
			// A preflight carries no key: answered here, not metered.
			if err := f.cors.Preflight(origin, method, string(ctx.Request.Header.Peek("Access-Control-Request-Headers")), set); err != nil {
				f.fail(ctx, err, rid)
			} else {
				ctx.SetStatusCode(fh.StatusNoContent)
			}
			f.s.Observe(edge.Route{}, false, ctx.Response.StatusCode(), f.s.Now().Sub(start))
			return
		}
		f.cors.Label(origin, set)
	}
	ci := edge.CallInfo{
		Method: method(ctx.Method()),
		// The path as the upstream gets it: routes are matched on it
		// (edge.RoutePath), not on fasthttp's decoded and resolved one.
		Path:          string(ctx.URI().PathOriginal()),
		Authorization: string(ctx.Request.Header.Peek(fh.HeaderAuthorization)),
		Remote:        ctx.RemoteAddr(),
		Forwarded:     (*forwardedOf)(&ctx.Request.Header),
		At:            start,
		// A protocol the edge does not carry (edge.upgrade_protocols) is
		// not switched to: the call is proxied as an ordinary one, which
		// drops its Upgrade header.
		Upgrade: isUpgrade(&ctx.Request.Header) && f.s.UpgradeAllowed(string(ctx.Request.Header.Peek(fh.HeaderUpgrade))),
	}
	if ci.Upgrade && ctx.Request.Header.ContentLength() == -1 {
		// A handshake has no body (WebSocket's never does); a chunked one
		// would have to be re-framed, so it is refused, before admission:
		// refused after it, it was charged to the rate limit and the quota
		// and never metered.
		f.fail(ctx, edge.NewAPIError(fh.StatusBadRequest, edge.TypeInvalidRequest, "invalid_upgrade",
			"A request to switch protocols must not have a chunked body."), rid)
		f.s.Observe(edge.Route{}, false, ctx.Response.StatusCode(), f.s.Now().Sub(start))
		return
	}
	var overrides []string // every value of every method-override header
	for _, name := range edge.MethodOverrideHeaders {
		for _, v := range ctx.Request.Header.PeekAll(name) {
			overrides = append(overrides, string(v))
		}
	}
	// A query with neither "method" nor an escape has no override: most
	// calls are spared the string.
	if q := ctx.URI().QueryString(); edge.QueryMayOverrideMethod(q) {
		overrides = edge.AppendQueryMethodOverrides(overrides, string(q))
	}
	ci.MethodOverride = edge.PickMethodOverride(ci.Method, overrides)
	// Admit's header names are canonical already, so fasthttp need not
	// copy and normalize each one.
	adm, err := f.s.Admit(ctx, ci, func(name string, value []byte) { ctx.Response.Header.SetCanonical([]byte(name), value) })
	if err != nil {
		f.fail(ctx, err, rid)
		f.s.Observe(adm.Route, adm.Routed, ctx.Response.StatusCode(), f.s.Now().Sub(start))
		return
	}
	call := edge.Call{Key: adm.Key, Route: adm.Route, ID: id, Method: ci.Method, RequestID: rid}
	if ci.Upgrade {
		f.upgrade(ctx, adm, call, start)
		return
	}
	f.proxy(ctx, adm, call, start)
}

// slowCall hands a call to the edge's net/http handler. The adaptor reads
// the whole body into memory first, so the body is read here, up to what
// POST /v1/events accepts, and a longer one is refused without reading on.
func (f *Front) slowCall(ctx *fh.RequestCtx) {
	if bs := ctx.RequestBodyStream(); bs != nil && (string(ctx.URI().PathOriginal()) != "/v1/events" ||
		!f.s.MayReportEvents(ctx, string(ctx.Request.Header.Peek(fh.HeaderAuthorization)), f.s.Now())) {
		// A health check has no use for a body, and the handler refuses
		// this caller's report: either gets its answer without the edge
		// reading, let alone holding, its body (a health check's was read
		// into memory, up to 8 MiB each, with no key asked), and the
		// connection closes after it.
		ctx.SetConnectionClose()
		ctx.Request.SetBody(nil)
		f.slow(ctx)
		return
	}
	if bs := ctx.RequestBodyStream(); bs != nil {
		b, err := io.ReadAll(io.LimitReader(bs, edge.MaxBatchBytes+1))
		if err == nil && len(b) > edge.MaxBatchBytes {
			err = edge.NewAPIError(fh.StatusRequestEntityTooLarge, edge.TypeInvalidRequest, "payload_too_large",
				fmt.Sprintf("The request body is larger than %d bytes.", edge.MaxBatchBytes))
		}
		if err != nil {
			var ae *edge.APIError
			if !errors.As(err, &ae) {
				ae = edge.NewAPIError(fh.StatusBadRequest, edge.TypeInvalidRequest, "invalid_body", "Could not read the request body.")
			}
			_, rid := edge.NewRequestID()
			ctx.Response.Header.Set(edge.HeaderRequestID, rid)
			if f.cors != nil { // as the handler labels its answers, so a page can read this one
				f.cors.Label(string(ctx.Request.Header.Peek("Origin")), func(name, value string) { ctx.Response.Header.Set(name, value) })
			}
			ctx.SetConnectionClose() // the rest of the body is not read
			f.fail(ctx, ae, rid)
			return
		}
		ctx.Request.SetBody(b)
	}
	f.slow(ctx)
}

// requestError answers a request fasthttp could not read, in the edge's
// one error shape like every other error.
func (f *Front) requestError(ctx *fh.RequestCtx, err error) {
	var small *fh.ErrSmallBuffer
	var netErr net.Error
	ae := edge.NewAPIError(fh.StatusBadRequest, edge.TypeInvalidRequest, "malformed_request", "The request could not be read as HTTP/1.1.")
	switch {
	case errors.As(err, &small):
		ae = edge.NewAPIError(fh.StatusRequestHeaderFieldsTooLarge, edge.TypeInvalidRequest, "headers_too_large",
			fmt.Sprintf("The request's headers are larger than %d bytes.", maxHeaderBytes))
	case errors.Is(err, fh.ErrBodyTooLarge):
		ae = edge.NewAPIError(fh.StatusRequestEntityTooLarge, edge.TypeInvalidRequest, "payload_too_large", "The request body is too large.")
	case errors.As(err, &netErr) && netErr.Timeout():
		ae = edge.NewAPIError(fh.StatusRequestTimeout, edge.TypeInvalidRequest, "request_timeout", "The request did not arrive in time.")
	}
	_, rid := edge.NewRequestID()
	ctx.Response.Header.Set(edge.HeaderRequestID, rid)
	f.fail(ctx, ae, rid)
	// The caller may still be sending what was not read (the rest of
	// headers too large): closing now, with it unread, would reset the
	// connection, and the caller could lose this answer with it.
	lingerOn(ctx)
}

// errShuttingDown answers a call or an upgrade the stopping edge does not
// take.
func errShuttingDown() *edge.APIError {
	return edge.RetryShortly(edge.NewAPIError(fh.StatusServiceUnavailable, edge.TypeAPI, "shutting_down", "This edge is stopping; retry the call."))
}

// lingerOn has the call's connection read and drop what the caller still
// sends before it closes (callerConn.Close).
func lingerOn(ctx *fh.RequestCtx) {
	conn := ctx.Conn()
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	if cc, ok := conn.(*callerConn); ok {
		cc.linger.Store(true)
	}
}

// fail answers with err in the edge's one error shape.
func (f *Front) fail(ctx *fh.RequestCtx, err error, rid string) {
	ae := f.s.RenderError(err, rid)
	if ae.Status == fh.StatusUnauthorized && len(ctx.Response.Header.Peek(fh.HeaderWWWAuthenticate)) == 0 {
		ctx.Response.Header.Set(fh.HeaderWWWAuthenticate, edge.WWWAuthenticate)
	}
	ae.SetHeaders(func(name string) string { return string(ctx.Response.Header.Peek(name)) }, ctx.Response.Header.Set)
	ctx.SetStatusCode(ae.Status)
	if ctx.IsHead() {
		return
	}
	ctx.SetContentType("application/json")
	b, merr := edge.ErrorJSON(ae)
	if merr != nil {
		f.log.Error("encode error response", "err", merr)
	}
	ctx.SetBody(b)
}

// hopByHop are the headers that describe one connection, not the call
// (RFC 9110, 7.6.1), so a proxy does not forward them. fasthttp keeps
// Connection and Transfer-Encoding itself, per connection.
var hopByHop = [...]string{"Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Upgrade"}

// isHopByHop reports whether name (in fasthttp's canonical form) is a
// hop-by-hop header.
func isHopByHop(name []byte) bool {
	for _, h := range hopByHop {
		if string(name) == h {
			return true
		}
	}
	return false
}

// headers is what dropHopByHop needs of a request or response header.
type headers interface {
	PeekAll(string) [][]byte
	Del(string)
}

// stripRequestHopByHop and stripResponseHopByHop drop the hop-by-hop
// headers, and those the Connection header names. Most calls have none, so
// one pass looks before anything is deleted. They take the concrete types,
// hence two: ranging over All through an interface put the iterator's state
// on the heap, twice per call, and one generic function over both types
// still does (its instances share one shape).
func stripRequestHopByHop(h *fh.RequestHeader) {
	var found bool
	for k := range h.All() {
		if found = isHopByHop(k) || string(k) == fh.HeaderConnection; found {
			break
		}
	}
	if found {
		dropHopByHop(h)
		// The caller's Connection line is the caller's: fasthttp keeps
		// only a bare "close" to itself, and forwarded, a list naming
		// Tollgate-Account would have the next proxy drop the edge's own
		// identity headers. Whether the caller's connection closes was
		// read before the handler ran.
		h.Del(fh.HeaderConnection)
	}
}

// stripResponseHopByHop also returns the names the Connection header named
// (nil for most answers): they describe the upstream's connection in the
// trailer too (passTrailers).
func stripResponseHopByHop(h *fh.ResponseHeader) (named []string) {
	var found bool
	for k := range h.All() {
		if found = isHopByHop(k) || string(k) == fh.HeaderConnection; found {
			break
		}
	}
	if found {
		return dropHopByHop(h)
	}
	return nil
}

func dropHopByHop(h headers) (named []string) {
	// Every Connection line counts: a second one may name a header too.
	// The names are copied out before any is deleted, since deleting moves
	// the values PeekAll points into.
	for _, c := range h.PeekAll(fh.HeaderConnection) {
		for _, name := range strings.Split(string(c), ",") {
			if name = strings.TrimSpace(name); name != "" && !strings.EqualFold(name, "close") && !strings.EqualFold(name, "keep-alive") && !edge.IsFraming(name) {
				named = append(named, name)
			}
		}
	}
	for _, name := range named {
		h.Del(name)
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
	return named
}

// setIdentity drops whatever the caller sent under the edge's reserved
// header prefix, underscore spellings of the forwarding headers
// (edge.IsForwardingAlias) and the rewrite headers (edge.IsRewriteHeader),
// then tells the upstream who is calling.
func setIdentity(h *fh.RequestHeader, k *edge.Key, trailers bool) {
	// Walking the parsed headers costs more than a look at the raw ones,
	// which almost never hold any of them; trailers are not among the raw
	// headers.
	if raw := h.RawHeaders(); trailers || len(raw) == 0 || rawHasIdentity(raw) || rawHasDroppedName(raw) {
		var forged []string
		for name := range h.All() {
			if len(name) >= len(edge.IdentityPrefix) && edge.IsIdentityHeader(string(name[:len(edge.IdentityPrefix)])) ||
				edge.IsForwardingAlias(string(name)) || edge.IsRewriteHeader(name) {
				forged = append(forged, string(name))
			}
		}
		for _, name := range forged {
			h.Del(name)
		}
	}
	// None is left, so Add (which does not look for an earlier line) will do.
	id := edge.IdentityOf(k)
	h.Add(edge.HeaderAccount, id.Account)
	h.Add(edge.HeaderEnvironment, id.Environment)
	h.Add(edge.HeaderKeyID, id.KeyID)
	h.Add(edge.HeaderPlan, id.Plan)
	var buf [256]byte
	h.AddBytesV(edge.HeaderScopes, id.AppendScopes(buf[:0]))
}

// rawHasDroppedName reports whether a header name in raw, the headers as
// received, has an underscore (see edge.IsForwardingAlias) or is a rewrite
// header (edge.IsRewriteHeader).
func rawHasDroppedName(raw []byte) bool {
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		if i := bytes.IndexByte(line, ':'); i > 0 {
			if name := line[:i]; bytes.IndexByte(name, '_') >= 0 || edge.IsRewriteHeader(name) {
				return true
			}
		}
	}
	return false
}

// rawHasIdentity reports whether a header line of raw, the headers as
// received, starts with the edge's reserved prefix.
func rawHasIdentity(raw []byte) bool {
	n := len(edge.IdentityPrefix)
	for len(raw) >= n {
		if edge.IsIdentityHeader(string(raw[:n])) {
			return true
		}
		i := bytes.IndexByte(raw, '\n')
		if i < 0 {
			return false
		}
		raw = raw[i+1:]
	}
	return false
}

// forward readies the caller's request for the upstream it goes to: the
// hop-by-hop headers and the key are dropped, Request-Id, the identity
// headers and X-Forwarded-* set, and the upstream's base path put in front of the path.
//
// trailers reports whether the caller's request may end in trailers (it is
// chunked, or announces some): its body must then go upstream from a copy
// that has none (proxy).
func (f *Front) forward(ctx *fh.RequestCtx, adm edge.Admission, rid string) (up *upstream, trailers bool) {
	up = f.live
	if adm.Key.Environment == schemas.Test {
		up = f.sandbox // the live upstream's address, in a pool of its own, when there is no sandbox
	}
	req := &ctx.Request
	// Request trailers are not forwarded (proxy sends a request that
	// announces none); any read already join the headers, where the
	// checks below see them.
	announced := announcesTrailers(&req.Header)
	if announced {
		_ = req.Header.SetTrailer("")
	}
	// A chunked body may end in trailers, announced or not.
	trailers = announced || req.Header.ContentLength() == -1
	stripRequestHopByHop(&req.Header)
	// fasthttp's client would send a body without a Content-Type as
	// application/octet-stream; the upstream gets what the caller sent.
	req.Header.SetNoDefaultContentType(true)
	req.Header.Del(fh.HeaderAuthorization)
	// A request in absolute form may carry credentials in its URI, which
	// fasthttp would send on as an Authorization header of its own.
	if u := req.URI(); len(u.Username()) > 0 || len(u.Password()) > 0 {
		u.SetUsername("")
		u.SetPassword("")
	}
	// The headers the edge sets are the edge's alone: Set replaces only
	// the first of several lines, so a caller's extra copies (a forged
	// Request-Id or X-Forwarded-Proto) are deleted first.
	req.Header.Del(edge.HeaderRequestID)
	req.Header.Set(edge.HeaderRequestID, rid)
	setIdentity(&req.Header, adm.Key, announced)
	// X-Forwarded-*, as net/http's ReverseProxy.SetXForwarded sets them:
	// every prior X-Forwarded-For line, in order, then the caller.
	var buf [128]byte
	xff := buf[:0]
	for _, prior := range req.Header.PeekAll(fh.HeaderXForwardedFor) {
		xff = append(append(xff, prior...), ", "...)
	}
	if ip, ok := netip.AddrFromSlice(ctx.RemoteIP()); ok {
		xff = ip.Unmap().AppendTo(xff)
	} else {
		xff = bytes.TrimSuffix(xff, []byte(", "))
	}
	req.Header.Del(fh.HeaderXForwardedFor)
	req.Header.SetBytesV(fh.HeaderXForwardedFor, xff)
	// The X-Forwarded-* headers are the edge's to set; a caller's RFC 7239
	// Forwarded, which Rack and Spring read first, would stand beside them
	// with whatever it says (net/http's ReverseProxy drops it too).
	req.Header.Del("Forwarded")
	req.Header.Del("X-Forwarded-Host")
	if host := req.Header.Host(); len(host) > 0 {
		req.Header.SetBytesV("X-Forwarded-Host", host)
	} else {
		// An HTTP/1.0 caller may send no Host; the upstream's own host
		// stands in, as net/http's ReverseProxy does (on the URI too,
		// which fasthttp writes the Host line from).
		req.Header.SetHost(up.host)
		req.URI().SetHost(up.host)
	}
	proto := "http"
	if ctx.IsTLS() {
		proto = "https"
	}
	req.Header.Del(fh.HeaderXForwardedProto)
	req.Header.Set(fh.HeaderXForwardedProto, proto)
	if up.base != "" {
		// The target as sent, behind the base path: routes were matched
		// on it. req.RequestURI() would rebuild it from fasthttp's decoded
		// path, turning /v1/admin%3Bx/users (matched as a tenant's) into
		// /v1/admin;x/users, which a Java upstream serves as
		// /v1/admin/users.
		u := req.URI()
		target := append([]byte(up.base), u.PathOriginal()...)
		if q := u.QueryString(); len(q) > 0 {
			target = append(append(target, '?'), q...)
		}
		req.SetRequestURIBytes(target)
	}
	// The host client refuses a request whose scheme is not its own: the
	// caller's connection, or an absolute-form target (GET https://…),
	// may name another.
	scheme := "http"
	if up.hc.IsTLS {
		scheme = "https"
	}
	req.URI().SetScheme(scheme)
	return up, trailers
}

// maxSends bounds the sends of one call: fasthttp's own bound for calls it
// may send again. An upstream that restarts closes every kept-alive
// connection in the pool, and each call may find one or two of them before
// a live one.
const maxSends = 5

// sendAgain reports whether a call whose connection to the upstream
// closed under it is sent once more: a kept-alive connection the upstream
// closed as the call went out is the usual cause, and the call did not run.
// But the upstream may also have run it and then dropped the connection (a
// handler that panicked, a crash), and the edge cannot tell which, so only
// a call that may run more than once is: a safe method (GET, HEAD,
// OPTIONS, TRACE) on a route not marked write, without a body the edge
// would have to read again. A call the upstream timed out on is never sent
// again: it would wait out upstream_timeout once more.
func sendAgain(req *fh.Request, r edge.Route, err error) bool {
	if r.Write || req.IsBodyStream() || len(req.Body()) > 0 || !connectionClosed(err) {
		return false
	}
	switch string(req.Header.Method()) {
	case fh.MethodGet, fh.MethodHead, fh.MethodOptions, fh.MethodTrace:
		return true
	}
	return false
}

// connectionClosed reports whether err is an upstream connection found
// closed, the one error after which a call may be sent again.
func connectionClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, fh.ErrConnectionClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// upstreamError is the answer to a call the upstream did not take: 503
// when every connection to it stayed busy (edge.upstream_max_conns), 504
// when it timed out, else 502.
func upstreamError(err error) *edge.APIError {
	if errors.Is(err, fh.ErrNoFreeConns) {
		return edge.UpstreamBusy()
	}
	var netErr net.Error
	if errors.Is(err, fh.ErrTimeout) || errors.Is(err, fh.ErrDialTimeout) || errors.As(err, &netErr) && netErr.Timeout() {
		return edge.NewAPIError(fh.StatusGatewayTimeout, edge.TypeAPI, "upstream_timeout", "The upstream service did not answer in time.")
	}
	return edge.NewAPIError(fh.StatusBadGateway, edge.TypeAPI, "upstream_unavailable", "The upstream service could not be reached.")
}

// exchange is one proxied call's state, from its admission to the last
// byte of its answer: one allocation per call instead of one per part.
type exchange struct {
	f       *Front
	route   edge.Route
	call    edge.Call
	counted countingReader
	body    responseBody
}

// finish records the call with the bytes sent (responseBody's finisher).
func (x *exchange) finish(sent int64) {
	x.call.RequestBytes, x.call.ResponseBytes = x.counted.n, sent
	x.call.End = x.f.s.Now()
	x.f.s.EmitCall(x.call)
	x.f.s.Observe(x.route, true, x.call.Status, x.call.End.Sub(x.call.Start))
}

// announcesTrailers reports whether the request announces trailers.
func announcesTrailers(h *fh.RequestHeader) bool {
	for range h.Trailers() {
		return true
	}
	return false
}

func (f *Front) proxy(ctx *fh.RequestCtx, adm edge.Admission, call edge.Call, start time.Time) {
	call.Start = start
	x := &exchange{f: f, route: adm.Route, call: call}
	up, trailers := f.forward(ctx, adm, call.RequestID)
	req := &ctx.Request
	if trailers {
		// Request trailers are not forwarded: they arrive after the
		// headers were checked, and could carry forged identity headers
		// past the checks. fasthttp reads a streamed body's trailers into
		// the caller's request, and adds them to its trailer set whether
		// they were announced or not, so the upstream gets a copy that
		// has none.
		out := fh.AcquireRequest()
		defer fh.ReleaseRequest(out)
		req.CopyTo(out)
		_ = out.Header.SetTrailer("")
		if bs := ctx.RequestBodyStream(); bs == nil {
			out.SetBody(req.Body())
		}
		req = out
	}
	counted := &x.counted
	if bs := ctx.RequestBodyStream(); bs != nil {
		// Each read of the caller's body may wait upstream_timeout, as each
		// read from the upstream may: an upload that keeps coming is never
		// cut, however long it takes in all.
		conn, limit := ctx.Conn(), f.timeout
		counted.r = readerFunc(func(p []byte) (int, error) {
			_ = conn.SetReadDeadline(time.Now().Add(limit))
			return bs.Read(p)
		})
		counted.want = int64(max(req.Header.ContentLength(), -1))
		req.SetBodyStream(counted, req.Header.ContentLength())
	} else {
		counted.n = int64(len(req.Body()))
	}
	var held *uploadHold
	if ctx.RequestBodyStream() != nil && edge.HoldsUpload(int64(ctx.Request.Header.ContentLength())) {
		held = f.holdUpload(ctx, adm, call.RequestID)
	}

	resp := fh.AcquireResponse()
	// fasthttp would report an answer without a Content-Type as
	// text/plain, and the caller would get that, a 204 and a 304 too.
	resp.Header.SetNoDefaultContentType(true)
	var err error
	if n := req.Header.ContentLength(); ctx.RequestBodyStream() != nil && n >= 0 && n <= bufferedUploadBytes {
		// A short body is read whole before an upstream connection is
		// taken, as nginx buffers one: streamed, a caller trickling it
		// held a pooled connection for as long as it liked, and a few
		// hundred such calls (with any key, a test one included) left
		// every other caller 503 upstream_busy.
		var body []byte
		if body, err = readGrowing(counted, n); err == nil {
			counted.eof = true
			req.SetBodyStream(bytes.NewReader(body), n)
		} else if counted.err == nil {
			counted.err = err
		}
	}
	if err == nil {
		err = up.hc.Do(req, resp)
		for sent := 1; err != nil && sent < maxSends && sendAgain(req, adm.Route, err); sent++ {
			err = up.hc.Do(req, resp)
		}
	}
	if held.over() {
		// The key ended during the upload or the wait for the answer: the
		// caller's connection is closed, so this answer is for the event.
		fh.ReleaseResponse(resp)
		f.fail(ctx, edge.KeyEnded(), call.RequestID)
		ctx.SetConnectionClose()
		x.call.Status = fh.StatusUnauthorized
		x.finish(0)
		return
	}
	drainBody(counted)
	if err == nil && resp.StatusCode() == fh.StatusSwitchingProtocols {
		// A switch on a call that asked for none (or for one the edge
		// does not carry, whose Upgrade was dropped): its connection now
		// speaks another protocol, so it is closed, not pooled, and the
		// call is answered 502, as net/http's ReverseProxy answers it.
		resp.SetConnectionClose()
		_ = resp.CloseBodyStream()
		err = errors.New("the upstream switched protocols on a call that did not ask it to")
	}
	if err == nil && resp.StatusCode() < 100 {
		// Not an HTTP status (fasthttp parses any three digits): passed
		// on, it would make the caller's status line invalid. (A status
		// of 000 reads as 200 in fasthttp, and goes on as such.)
		resp.SetConnectionClose()
		_ = resp.CloseBodyStream()
		err = fmt.Errorf("the upstream answered status %03d, which is not an HTTP status", resp.StatusCode())
	}
	if err != nil {
		fh.ReleaseResponse(resp)
		ae := upstreamError(err)
		if counted.err != nil {
			// The caller's body broke off or stalled: not the upstream's doing.
			err = counted.err
			ae = edge.NewAPIError(fh.StatusBadRequest, edge.TypeInvalidRequest, "invalid_body", "Could not read the request body.")
			var netErr net.Error
			if errors.As(err, &netErr) && netErr.Timeout() {
				ae = edge.NewAPIError(fh.StatusRequestTimeout, edge.TypeInvalidRequest, "request_timeout", "The request did not arrive in time.")
			}
			ctx.SetConnectionClose()
			f.log.Info("request body broke off", "status", ae.Status, "err", err)
		} else {
			f.log.Warn("upstream error", "status", ae.Status, "err", err)
		}
		f.fail(ctx, ae, call.RequestID)
		x.call.Status = ae.Status
		x.finish(0)
		return
	}

	ctx.SetStatusCode(resp.StatusCode())
	// A chunked answer may end in trailers: they follow the body
	// (responseBody.Read), unannounced, as on the net/http front. Announced,
	// a name the head also carries would have its head values moved into
	// the trailer by fasthttp (the edge's own Vary: Origin among them).
	chunked := resp.Header.ContentLength() == -1 && !ctx.IsHead()
	connNamed := stripResponseHopByHop(&resp.Header)
	for k, v := range resp.Header.All() {
		switch string(k) {
		case fh.HeaderContentLength, fh.HeaderTransferEncoding, fh.HeaderDate, fh.HeaderConnection:
			continue
		}
		if f.cors != nil && edge.IsCORSHeader(string(k)) || edge.IsEdgeHeader(string(k)) {
			continue // the edge's own stand
		}
		ctx.Response.Header.AddBytesKV(k, v)
	}
	x.call.Status = resp.StatusCode()
	if ctx.IsHead() {
		ctx.Response.SkipBody = true
		ctx.Response.Header.SetContentLength(resp.Header.ContentLength())
		_ = resp.CloseBodyStream()
		fh.ReleaseResponse(resp)
		x.finish(0)
		return
	}
	bs := resp.BodyStream()
	if bs == nil {
		ctx.Response.SetBody(resp.Body())
		sent := int64(len(resp.Body()))
		fh.ReleaseResponse(resp)
		x.finish(sent)
		return
	}
	if n := resp.Header.ContentLength(); n >= 0 && n <= shortAnswerBytes {
		f.readShort(ctx, resp, bs, n, x)
		return
	}
	// The body streams to the caller after this handler returns; fasthttp
	// closes the stream when it is done, which hands the upstream
	// connection back and records the call.
	size := resp.Header.ContentLength()
	if size < 0 {
		size = -1
	}
	x.body = responseBody{r: bs, resp: resp, done: x}
	if chunked {
		x.body.trailers, x.body.cors, x.body.connNamed = &ctx.Response.Header, f.cors != nil, connNamed
	}
	f.holdLongAnswer(ctx, adm, call.RequestID, &x.body, int64(size))
	ctx.Response.SetBodyStream(&x.body, size)
}

// readGrowing reads exactly n bytes from r into a buffer that grows as
// they come, never past n: made at n, a caller that sent the head and
// stalled held all of it; grown by bytes.Buffer, a whole body took up to
// four times its size.
func readGrowing(r io.Reader, n int) ([]byte, error) {
	b := make([]byte, 0, min(n, 16<<10))
	for len(b) < n {
		if len(b) == cap(b) {
			grown := make([]byte, len(b), min(2*cap(b), n))
			copy(grown, b)
			b = grown
		}
		m, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+m]
		if err != nil && len(b) < n {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return b, err
		}
	}
	return b, nil
}

// bufferedUploadBytes is the longest body the front reads whole before it
// takes an upstream connection for the call; a longer one streams.
const bufferedUploadBytes = 64 << 10

// shortAnswerBytes is the longest answer the front reads whole before the
// caller gets any of it, rather than streaming it through.
const shortAnswerBytes = 16 << 10

// readShort reads a short answer's body (n bytes, as its head gives) whole
// and hands resp, and its upstream connection, back at once; the caller's
// answer then goes out in one write, as a plain proxy's does. Streaming it
// held the upstream connection until the caller's write was done (on the
// benchmark the CPU per call was the same either way, within the noise).
// If the upstream breaks off mid-body, what came is streamed to
// the caller and its connection cut, as with a longer answer.
func (f *Front) readShort(ctx *fh.RequestCtx, resp *fh.Response, bs io.Reader, n int, x *exchange) {
	bp, _ := f.short.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, shortAnswerBytes)
		bp = &b
	}
	defer f.short.Put(bp)
	b := (*bp)[:n]
	got, err := io.ReadFull(bs, b)
	if err == nil {
		ctx.Response.SetBody(b)
		_ = resp.CloseBodyStream()
		fh.ReleaseResponse(resp)
		x.finish(int64(n))
		return
	}
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	partial := append([]byte(nil), b[:got]...)
	x.body = responseBody{r: io.MultiReader(bytes.NewReader(partial), errReader{err}), resp: resp, done: x}
	ctx.Response.SetBodyStream(&x.body, n)
}

// errReader fails every read with err.
type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// holdLongAnswer holds a long answer (edge.HoldsAnswer) under its key: once
// the key is no longer usable, the caller's connection is closed, which
// cuts the answer where it is (and the upstream's side goes with the
// body). Call it before the body is handed to fasthttp.
func (f *Front) holdLongAnswer(ctx *fh.RequestCtx, adm edge.Admission, rid string, body *responseBody, contentLength int64) {
	if !edge.HoldsAnswer(contentLength) {
		return
	}
	conn := ctx.Conn()
	body.release = f.s.HoldKey(adm.Key, adm.KeyEpoch, func() {
		if body.cut(conn) {
			f.log.Info("long answer cut: its API key is no longer usable", "key_id", adm.Key.ID, "request_id", rid)
		}
	})
}

// uploadHold holds a call with a streamed or long upload
// (edge.HoldsUpload) under its key from its admission until the upstream's
// answer begins (a long answer is then held by holdLongAnswer): once the
// key is no longer usable, the caller's connection is closed, which cuts
// the upload where it is, and the caller gets nothing more. mu orders that
// with over, so that a connection is never closed under the next call on
// it.
type uploadHold struct {
	mu      sync.Mutex
	done    bool
	ended   bool
	release func()
}

func (f *Front) holdUpload(ctx *fh.RequestCtx, adm edge.Admission, rid string) *uploadHold {
	h := &uploadHold{}
	conn := ctx.Conn()
	h.release = f.s.HoldKey(adm.Key, adm.KeyEpoch, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.done {
			return
		}
		h.ended = true
		_ = conn.Close()
		f.log.Info("upload cut: its API key is no longer usable", "key_id", adm.Key.ID, "request_id", rid)
	})
	return h
}

// over ends the hold (of none: nil) and reports whether the key ended the
// call first.
func (h *uploadHold) over() bool {
	if h == nil {
		return false
	}
	h.mu.Lock()
	h.done = true
	ended := h.ended
	h.mu.Unlock()
	h.release()
	return ended
}

// countingReader counts what is read through it, and remembers how it
// ended.
type countingReader struct {
	r   io.Reader
	n   int64
	eof bool
	err error // a read error other than io.EOF
	// want is the body's declared length (-1: chunked, or none).
	want int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	switch {
	case err == io.EOF && c.want >= 0 && c.n < c.want:
		// The caller hung up before its body's declared end: fasthttp's
		// stream ends as if the body were whole. It is the caller's
		// break-off (400), not the upstream's failure (502).
		err = io.ErrUnexpectedEOF
		c.err = err
	case err == io.EOF:
		c.eof = true
	case err != nil:
		c.err = err
	}
	return n, err
}

// readerFunc is a function as an io.Reader.
type readerFunc func(p []byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// maxDrain bounds what drainBody reads.
const maxDrain = 16 << 20

// drainBody reads and drops what is left of a caller's streamed body once
// the upstream has answered (or failed) without taking all of it: a 413 or
// a 401 before the upload ends, say. Closing a connection with unread data
// on it resets it, and the caller, still sending, would lose the answer
// (net/http's server and nginx's lingering close do the same). What is
// dropped is not counted as sent. Past maxDrain the connection is closed
// anyway.
func drainBody(c *countingReader) {
	if c.r == nil || c.eof || c.err != nil {
		return
	}
	_, _ = io.CopyN(io.Discard, c.r, maxDrain)
}

// responseBody streams an upstream's answer to the caller and, when
// fasthttp closes it, releases what the answer came on and records the
// call with the bytes sent.
type responseBody struct {
	r io.Reader
	n int64
	// resp is an answer from the pool, handed back (with its connection)
	// on close. An answer on a connection of its own (a declined upgrade)
	// has closers instead: its body and that connection.
	resp    *fh.Response
	closers []io.Closer
	done    finisher
	once    sync.Once
	// trailers, for a chunked answer from resp, is the caller's answer
	// head, which gets resp's trailers when its body ends; fasthttp writes
	// them after the last chunk.
	trailers *fh.ResponseHeader
	cors     bool
	// connNamed are the names the upstream's Connection header named:
	// not passed on as trailers either.
	connNamed []string
	// release forgets the hold a long answer is under (edge.HoldsAnswer),
	// if any; ended is set once its key ended it, and mu orders that with
	// Close, so that a connection is never closed under the next call on
	// it.
	release func()
	mu      sync.Mutex
	closed  bool
	ended   atomic.Bool
}

// cut ends the answer, unless it is over: no more of it is passed on, and
// conn, the caller's, is closed. It reports whether it cut.
func (b *responseBody) cut(conn net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.ended.Store(true)
	_ = conn.Close()
	return true
}

// finisher records a call once its answer has been sent.
type finisher interface{ finish(sent int64) }

// finishFunc is a function as a finisher.
type finishFunc func(sent int64)

func (f finishFunc) finish(sent int64) { f(sent) }

func (b *responseBody) Read(p []byte) (int, error) {
	if b.ended.Load() {
		return 0, edge.ErrKeyEnded
	}
	n, err := b.r.Read(p)
	b.n += int64(n)
	if err == io.EOF && b.trailers != nil {
		passTrailers(b.trailers, &b.resp.Header, b.cors, b.connNamed)
		b.trailers = nil
	}
	return n, err
}

// passTrailers adds the trailers of an upstream's answer (from) that the
// caller gets (edge.KeepsResponseTrailer) to the caller's answer (to),
// whose head is out already: marking a name as a trailer then announces
// nothing and moves no head value. Only the trailer section is read: a
// field of the same name in the upstream's head stays there. Names the
// upstream's Connection header named (connNamed) are not passed on.
func passTrailers(to, from *fh.ResponseHeader, cors bool, connNamed []string) {
	section := from.TrailerHeader() // "Name: value\r\n" lines, then "\r\n"
	for len(section) > 0 {
		line, rest, _ := bytes.Cut(section, []byte("\r\n"))
		section = rest
		name, value, ok := bytes.Cut(line, []byte(": "))
		if !ok || !edge.KeepsResponseTrailer(string(name), cors) || slices.ContainsFunc(connNamed, func(n string) bool {
			return strings.EqualFold(n, string(name))
		}) {
			continue
		}
		if !isTrailer(to, name) {
			if err := to.AddTrailerBytes(name); err != nil {
				continue // a field fasthttp never sends as a trailer
			}
		}
		to.AddBytesKV(name, value)
	}
}

// isTrailer reports whether h has name among its trailers.
func isTrailer(h *fh.ResponseHeader, name []byte) bool {
	for t := range h.Trailers() {
		if bytes.EqualFold(t, name) {
			return true
		}
	}
	return false
}

func (b *responseBody) Close() error {
	var err error
	b.once.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		if b.release != nil {
			b.release()
		}
		if b.resp != nil {
			err = b.resp.CloseBodyStream()
			fh.ReleaseResponse(b.resp)
		}
		for _, c := range b.closers {
			err = errors.Join(err, c.Close())
		}
		b.done.finish(b.n)
	})
	return err
}

// forwardedOf is a request's header as an edge.Forwarded: a conversion, so
// a call pays for its X-Forwarded-For only when its audit event asks.
type forwardedOf fh.RequestHeader

func (h *forwardedOf) ForwardedFor() []string {
	var values []string
	for _, v := range (*fh.RequestHeader)(h).PeekAll(fh.HeaderXForwardedFor) {
		values = append(values, string(v))
	}
	return values
}

// printfLogger is fasthttp's logger on slog; fasthttp logs connection
// errors (a caller hanging up mid-call), which are not news at Info.
type printfLogger struct{ log *slog.Logger }

func (l printfLogger) Printf(format string, args ...any) {
	if l.log.Enabled(context.Background(), slog.LevelDebug) {
		l.log.Debug(redactSecrets(fmt.Sprintf(format, args...)))
	}
}

// What fasthttp logs about a request it could not parse quotes the header
// line or value it choked on ("missing colon: …", "invalid header value
// …"), whatever SecureErrorLogMessage says, and that can be the caller's
// Authorization, a key in Basic auth's base64 among them. So every quoted
// string in it but an address (host:port) is dropped whole, and every
// key-shaped word outside quotes too.
var (
	quotedString = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	keyShaped    = regexp.MustCompile(`((?:sk|pk|rk)_(?:live|test)_)[0-9A-Za-z]+`)
)

func redactSecrets(s string) string {
	s = quotedString.ReplaceAllStringFunc(s, func(q string) string {
		if u, err := strconv.Unquote(q); err == nil {
			if _, err := netip.ParseAddrPort(u); err == nil {
				return q
			}
		}
		return `"[redacted]"`
	})
	return keyShaped.ReplaceAllString(s, "${1}[redacted]")
}

// silentConn is a connection to the upstream on which no read or write may
// wait longer than about limit: each one gets a deadline of its own, and the
// deadlines fasthttp sets are ignored. So upstream_timeout bounds how long
// the upstream may stay silent (before its answer, or between two parts of
// a streamed body) or stall a write, as nginx's proxy_read_timeout and
// proxy_send_timeout do, and a stream that keeps sending is never cut.
//
// Setting a deadline updates a timer in the runtime, which cost about
// 0.8 µs per proxied call when every read and write did it. So a deadline
// moves only when less than limit is left of it, and then to limit +
// limit/16 ahead: each silence may last between limit and limit + limit/16,
// and the reads and writes of a busy connection seldom move it. A
// connection is used by one call at a time, and its reads and writes each
// keep their own deadline, so the fields need no lock.
type silentConn struct {
	net.Conn
	limit           time.Duration
	readBy, writeBy time.Time
}

func (c *silentConn) Read(p []byte) (int, error) {
	if now := time.Now(); c.readBy.Sub(now) < c.limit {
		c.readBy = now.Add(c.limit + c.limit/16)
		if err := c.Conn.SetReadDeadline(c.readBy); err != nil {
			return 0, err
		}
	}
	return c.Conn.Read(p)
}

func (c *silentConn) Write(p []byte) (int, error) {
	if now := time.Now(); c.writeBy.Sub(now) < c.limit {
		c.writeBy = now.Add(c.limit + c.limit/16)
		if err := c.Conn.SetWriteDeadline(c.writeBy); err != nil {
			return 0, err
		}
	}
	return c.Conn.Write(p)
}

// callerListener hands out its connections as callerConns.
type callerListener struct {
	net.Listener
	limit time.Duration
	// conns, when set, holds every connection open.
	conns *connSet
}

func (l callerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return c, err
	}
	cc := &callerConn{Conn: c, limit: l.limit, set: l.conns}
	if l.conns != nil {
		l.conns.add(cc)
	}
	return cc, nil
}

// callerConn is a caller's connection on which no write may stall longer
// than about limit (upstream_timeout), as silentConn bounds the upstream's:
// a caller that stops reading a streamed answer would otherwise hold the
// call, and the upstream connection under it, for ever. A caller that keeps
// reading is never cut. The deadline moves lazily, as silentConn's does.
// Writes come from one goroutine at a time (the call's, or a tunnel's copy
// to the caller); a deadline set from outside (a TLS handshake, fasthttp)
// is kept until the next write, which sets its own.
type callerConn struct {
	net.Conn
	limit   time.Duration
	writeBy atomic.Int64 // UnixNano of the write deadline this conn set; 0 when another was set since
	// linger asks Close to read what the caller still sends first.
	linger atomic.Bool
	// set holds the connection while it is open (nil: none).
	set *connSet
}

// Lingering close, as nginx's lingering_close: after an answer to a request
// that was not read whole, the edge stops writing, reads and drops what the
// caller still sends, for up to lingerFor or lingerBytes, then closes.
const (
	lingerFor   = 2 * time.Second
	lingerBytes = 4 << 20
)

func (c *callerConn) Close() error {
	if c.set != nil {
		c.set.remove(c)
	}
	if c.linger.Load() {
		if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
			if c.Conn.SetReadDeadline(time.Now().Add(lingerFor)) == nil {
				_, _ = io.CopyN(io.Discard, c.Conn, lingerBytes)
			}
		}
	}
	return c.Conn.Close()
}

func (c *callerConn) Write(p []byte) (int, error) {
	if c.limit <= 0 {
		return c.Conn.Write(p)
	}
	now := time.Now()
	if wb := c.writeBy.Load(); wb == 0 || time.Unix(0, wb).Sub(now) < c.limit {
		by := now.Add(c.limit + c.limit/16)
		c.writeBy.Store(by.UnixNano())
		if err := c.Conn.SetWriteDeadline(by); err != nil {
			return 0, err
		}
	}
	return c.Conn.Write(p)
}

func (c *callerConn) SetWriteDeadline(t time.Time) error {
	c.writeBy.Store(0)
	return c.Conn.SetWriteDeadline(t)
}

func (c *callerConn) SetDeadline(t time.Time) error {
	c.writeBy.Store(0)
	return c.Conn.SetDeadline(t)
}

func (c *silentConn) SetDeadline(time.Time) error      { return nil }
func (c *silentConn) SetReadDeadline(time.Time) error  { return nil }
func (c *silentConn) SetWriteDeadline(time.Time) error { return nil }
