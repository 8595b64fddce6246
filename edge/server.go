package edge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/tollgate-dev/tollgate/schemas"
)

// HeaderRequestID names the response header (and event field) that ties a
// call to its usage event.
const HeaderRequestID = "Request-Id"

// Server is the edge HTTP handler.
type Server struct {
	cfg     Config
	keys    KeyStore
	emitter Emitter
	log     *slog.Logger
	now     func() time.Time
	live    *httputil.ReverseProxy
	sandbox *httputil.ReverseProxy
	echo    *echo.Echo
}

// NewServer builds the edge handler. cfg must be valid.
func NewServer(cfg Config, keys KeyStore, emitter Emitter, log *slog.Logger) (*Server, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, keys: keys, emitter: emitter, log: log, now: time.Now}
	var err error
	if s.live, err = s.newProxy(cfg.Upstream); err != nil {
		return nil, err
	}
	s.sandbox = s.live
	if cfg.SandboxUpstream != "" {
		if s.sandbox, err = s.newProxy(cfg.SandboxUpstream); err != nil {
			return nil, err
		}
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = errorHandler(log)
	e.Use(s.requestID)
	e.GET("/healthz", func(c echo.Context) error { return c.String(http.StatusOK, "ok\n") })
	e.Any("/*", s.proxy, s.authenticate)
	s.echo = e
	return s, nil
}

// ServeHTTP makes the Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.echo.ServeHTTP(w, r) }

func (s *Server) requestID(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		id := schemas.NewEventID()
		c.Set("event_id", id)
		c.Response().Header().Set(HeaderRequestID, "req_"+strings.ReplaceAll(id.String(), "-", ""))
		return next(c)
	}
}

// bearer extracts the key from "Authorization: Bearer <key>" or from HTTP
// basic auth's user name, as Stripe accepts.
func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	if u, _, ok := r.BasicAuth(); ok {
		return u
	}
	return ""
}

func (s *Server) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		raw := bearer(c.Request())
		if raw == "" {
			return ErrNoKey
		}
		pk, err := ParseKey(raw)
		if err != nil {
			return err
		}
		k, err := s.keys.KeyByHash(c.Request().Context(), pk.Hash)
		if err != nil {
			return err
		}
		if !HashEqual(k.Hash, pk.Hash[:]) {
			return ErrKeyNotFound
		}
		if err := k.Usable(s.now()); err != nil {
			return err
		}
		c.Set("key", &k)
		return next(c)
	}
}

func (s *Server) newProxy(upstream string) (*httputil.ReverseProxy, error) {
	u, err := url.Parse(upstream)
	if err != nil {
		return nil, fmt.Errorf("parse upstream %q: %w", upstream, err)
	}
	transport := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     90 * time.Second,
	}
	return &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
			r.Out.Header.Del("Authorization")
			r.SetXForwarded()
		},
		Transport:     transport,
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			ae := NewAPIError(http.StatusBadGateway, TypeAPI, "upstream_unavailable", "The upstream service could not be reached.")
			if errors.Is(err, context.DeadlineExceeded) {
				ae = NewAPIError(http.StatusGatewayTimeout, TypeAPI, "upstream_timeout", "The upstream service did not answer in time.")
			}
			s.log.Warn("upstream error", "err", err)
			panicFree(w, ae)
		},
	}, nil
}

func panicFree(w http.ResponseWriter, ae *APIError) {
	ae.RequestID = w.Header().Get(HeaderRequestID)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(ae.Status)
	_, _ = fmt.Fprintf(w, `{"error":{"type":%q,"code":%q,"message":%q,"request_id":%q,"doc_url":%q}}`,
		ae.Type, ae.Code, ae.Message, ae.RequestID, ae.DocURL)
}

type countingBody struct {
	io.ReadCloser
	n int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	return n, err
}

func (s *Server) proxy(c echo.Context) error {
	k := c.Get("key").(*Key)
	req := c.Request()
	start := s.now()
	body := &countingBody{ReadCloser: req.Body}
	req.Body = body
	ctx, cancel := context.WithTimeout(req.Context(), s.cfg.UpstreamTimeout)
	defer cancel()
	p := s.live
	if k.Environment == schemas.Test {
		p = s.sandbox
	}
	p.ServeHTTP(c.Response(), req.WithContext(ctx))
	resp := c.Response()
	ev := schemas.Event{
		Version:       schemas.EventVersion,
		ID:            c.Get("event_id").(uuid.UUID),
		AccountID:     k.AccountID,
		Environment:   k.Environment,
		KeyID:         k.ID,
		Type:          s.cfg.EventType,
		Time:          start,
		Route:         req.URL.Path,
		Method:        req.Method,
		Status:        resp.Status,
		LatencyMicros: s.now().Sub(start).Microseconds(),
		RequestBytes:  body.n,
		ResponseBytes: resp.Size,
		Units:         1,
		RequestID:     resp.Header().Get(HeaderRequestID),
	}
	ev.Normalize()
	s.emitter.Emit(ev)
	return nil
}
