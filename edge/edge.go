// Package edge authenticates every API call, enforces scopes, rate limits and
// quotas, forwards the call to the operator's upstream and emits one usage
// event per call. Storage and transport live in sub-packages (edge/postgres,
// edge/redis, edge/kafka); this package holds the rules.
package edge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/tollgate-dev/tollgate/internal/redact"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Key is a stored API key: everything the edge needs to decide a call,
// and nothing that would reveal the secret.
type Key struct {
	ID            string
	AccountID     string
	Environment   schemas.Environment
	Kind          KeyKind
	Name          string
	DisplayPrefix string
	Hash          []byte
	Scopes        []string
	ExpiresAt     *time.Time
	RevokedAt     *time.Time
	CreatedAt     time.Time
	RolledFrom    string
	// Plan is the account's plan in force when the key was looked up.
	Plan Plan
	// AccountTimezone is the account's IANA zone (for quota months).
	AccountTimezone string
	// PlanChangesIn is how long after the look-up the plan in force may
	// change on its own: a subscription ends, or a scheduled one starts
	// (0: none is scheduled). No notification comes when that time
	// arrives, so the key cache keeps the key no longer. It is a duration,
	// measured by the database's clock, so that an edge whose clock is off
	// does not keep the old plan for the difference.
	PlanChangesIn time.Duration
}

// Usable reports why a key may not be used at now, or nil when it may.
// A revocation takes effect at once whatever its time says: it is stamped
// by the clock of the process that revoked the key, and an edge whose clock
// runs behind would otherwise serve the key for the difference.
func (k *Key) Usable(now time.Time) error {
	if k.RevokedAt != nil {
		return ErrKeyRevoked
	}
	if k.ExpiresAt != nil && !now.Before(*k.ExpiresAt) {
		return ErrKeyExpired
	}
	return nil
}

// Plan is the part of a pricing plan the edge enforces.
type Plan struct {
	ID      string `json:"id" yaml:"id"`
	Version int    `json:"version" yaml:"version"`
	Limits  Limits `json:"limits" yaml:"limits"`
	// UpgradeURL is where a limited caller can buy more.
	UpgradeURL string `json:"upgrade_url,omitempty" yaml:"upgrade_url"`
}

// Limits is definition->'limits' of a plan.
type Limits struct {
	RequestsPerSecond int `json:"requests_per_second" yaml:"requests_per_second"`
	Burst             int `json:"burst" yaml:"burst"`
	// MonthlyRequests nil means unlimited.
	MonthlyRequests *int64 `json:"monthly_requests" yaml:"monthly_requests"`
}

// SpoolHold is an edge's claim on usage time while its events wait in its
// local spool. Events spooled while Kafka is unreachable reach Kafka later,
// with later record times than a usage watermark can see, so usage from
// Since on is not complete. Once the spool has drained (Released, when
// Kafka took the last of them), the claim lasts until the usage watermark
// passes Released: every drained event has landed by then. Zero Since: no
// events were spooled.
type SpoolHold struct {
	// Since is the earliest event time of the events spooled since the
	// spool was last empty.
	Since time.Time
	// Released is zero while the spool holds any of them.
	Released time.Time
}

// Domain errors, mapped to HTTP in one place (errors.go).
var (
	ErrKeyNotFound = errors.New("api key not found")
	ErrKeyRevoked  = errors.New("api key revoked")
	ErrKeyExpired  = errors.New("api key expired")
	ErrNoKey       = errors.New("no api key presented")
	ErrNotFound    = errors.New("not found")
	ErrInvalid     = errors.New("invalid request")
	ErrConflict    = errors.New("conflict")
)

// KeyStore finds keys by the SHA-256 of their secret, together with the
// account's plan in force now.
type KeyStore interface {
	KeyByHash(ctx context.Context, hash [32]byte) (Key, error)
}

// sharedKeyStore is a KeyStore that can hand out the key it holds itself,
// read-only, instead of a copy per call (KeyCache does). A Key is a few
// hundred bytes, so a copy for every call is an allocation and a copy the
// hot path need not make.
type sharedKeyStore interface {
	sharedKeyByHash(ctx context.Context, hash [32]byte) (*Key, error)
}

// Emitter accepts usage events for delivery. Emit must not block the
// response path: an implementation buffers, and accounts for every event it
// accepts (delivered, spooled, or reported as lost).
type Emitter interface {
	Emit(ev schemas.Event)
}

// Invalidation names what changed: a key (by hash) or an account (its plan).
type Invalidation struct {
	KeyHash   []byte
	AccountID string
	// All drops everything, e.g. after the notification channel reconnected
	// and changes may have been missed.
	All bool
}

// ParseInvalidation reads a notification payload: "key:<hex>" or "account:<id>".
func ParseInvalidation(payload string) (Invalidation, bool) {
	switch {
	case len(payload) > 4 && payload[:4] == "key:":
		h, err := hex.DecodeString(payload[4:])
		if err != nil || len(h) != 32 {
			return Invalidation{}, false
		}
		return Invalidation{KeyHash: h}, true
	case len(payload) > 8 && payload[:8] == "account:":
		return Invalidation{AccountID: payload[8:]}, true
	}
	return Invalidation{}, false
}

// Config is the edge's configuration.
type Config struct {
	// upstreamResolver looks up the upstream's host for the net/http
	// proxy; nil is the system's. Tests set a slow one.
	upstreamResolver *net.Resolver
	// Listen is the address the API listens on, e.g. "127.0.0.1:8080".
	Listen string `yaml:"listen"`
	// AdminListen is the address of the admin API and /metrics; keep it
	// off the public network. Empty disables the admin API.
	AdminListen string `yaml:"admin_listen"`
	// AdminTokenSHA256 is the hex SHA-256 of the admin bearer token.
	AdminTokenSHA256 string `yaml:"admin_token_sha256"`
	// Upstream is the operator's API for live keys.
	Upstream string `yaml:"upstream"`
	// SandboxUpstream serves test-mode keys; empty means Upstream.
	SandboxUpstream string `yaml:"sandbox_upstream"`
	// TLSCertFile and TLSKeyFile, both PEM, make the edge serve HTTPS on
	// Listen (TLS 1.2 or later, HTTP/1.1). Both empty: plain HTTP, for an
	// edge behind a TLS-terminating load balancer.
	TLSCertFile string `yaml:"tls_cert_file"`
	TLSKeyFile  string `yaml:"tls_key_file"`
	// UpstreamCAFile is a PEM file of certificate authorities trusted, on
	// top of the system's, for https upstreams (an internal CA, say).
	UpstreamCAFile string `yaml:"upstream_ca_file"`
	// UpstreamClientCertFile and UpstreamClientKeyFile, both PEM, are the
	// certificate the edge shows an https upstream that asks for one
	// (mutual TLS): an upstream that requires it takes calls from the
	// edge alone, and can trust the identity headers it sets.
	UpstreamClientCertFile string `yaml:"upstream_client_cert_file"`
	UpstreamClientKeyFile  string `yaml:"upstream_client_key_file"`
	// UpstreamTimeout bounds each silence of the upstream: the wait for its
	// answer (504 past it), between two parts of a streamed body, or on a
	// write of the request. A stream that keeps sending is never cut. The
	// fasthttp front may allow a silence up to 1/16 longer (silentConn).
	UpstreamTimeout time.Duration `yaml:"upstream_timeout"`
	// UpstreamIdleTimeout closes a kept-alive connection to the upstream
	// that has carried no call for this long (default 1s). Keep it below
	// the upstream's own keep-alive timeout (Node.js, uvicorn and Apache
	// close after 5s, gunicorn after 2s): the fasthttp front does not see
	// an upstream close an idle connection, and a call with a body sent on
	// one cannot be sent again, so it would fail with a 502.
	UpstreamIdleTimeout time.Duration `yaml:"upstream_idle_timeout"`
	// UpstreamMaxConns bounds the connections open to each upstream
	// (default 1024), so a slow upstream is not sent more calls at once
	// than it can take. Test-mode calls have a pool of their own, of the
	// same size, even when they go to the live upstream. A call that finds every connection busy waits for
	// one up to UpstreamTimeout, then gets a 503 upstream_busy with a
	// Retry-After, having never reached the upstream.
	UpstreamMaxConns int `yaml:"upstream_max_conns"`
	// UpgradeProtocols are the protocols a call may switch to (default
	// websocket). A call asking for another (h2c, say) is proxied as an
	// ordinary call, its Upgrade header dropped: a tunnel is metered as one
	// call, so a protocol that carries many requests inside one (HTTP/2
	// over h2c) would let them past the routes, the scopes, the limits and
	// the metering.
	UpgradeProtocols []string `yaml:"upgrade_protocols"`
	// MaxUpgradedConnections bounds the calls switched to another protocol
	// (WebSocket) an instance holds open at once, each a connection to the
	// caller and one to the upstream; more are refused with 503.
	MaxUpgradedConnections int `yaml:"max_upgraded_connections"`
	// UpgradedIdleTimeout closes an upgraded connection (WebSocket) that
	// carried no byte either way for this long, as nginx's
	// proxy_read_timeout and load balancers' idle timeouts do: a peer that
	// vanished without closing (a dropped NAT entry, a crashed client)
	// would otherwise hold two connections and a slot of
	// MaxUpgradedConnections for ever. WebSocket peers that ping more
	// often than this are never cut.
	UpgradedIdleTimeout time.Duration `yaml:"upgraded_idle_timeout"`
	// EventType is the type stamped on call events.
	EventType string `yaml:"event_type"`
	// Routes maps route patterns and methods to the scopes they need. Empty
	// means every path is proxied, needs no scope, and the raw path is the
	// event's route.
	Routes []RouteConfig `yaml:"routes"`
	// Plans are the limits used when the plans table does not define the
	// account's plan (for example before any plan is seeded).
	Plans map[string]Plan `yaml:"plans"`
	// KeyCacheTTL bounds how long a looked-up key is trusted without a
	// change notification; notifications invalidate at once.
	KeyCacheTTL time.Duration `yaml:"key_cache_ttl"`
	// KeyLookupTimeout bounds one lookup of a key in Postgres, a wait for
	// a pooled connection included: past it the call gets 503
	// key_store_unavailable.
	KeyLookupTimeout time.Duration `yaml:"key_lookup_timeout"`
	// RateLimitPrefix prefixes every Redis key the edge writes.
	RateLimitPrefix string `yaml:"rate_limit_prefix"`
	// ExpectedInstances sizes the local fallback limit when Redis is down:
	// each instance allows limit / ExpectedInstances.
	ExpectedInstances int `yaml:"expected_instances"`
	// SpoolDir holds events while Kafka is unreachable. It must survive a
	// restart and belong to one edge process (it is locked). Empty means
	// <user cache dir>/tollgate/edge-spool/<topic>.
	SpoolDir string `yaml:"spool_dir"`
	// SpoolMaxBytes bounds the spool's files on disk (default 4 GiB, about
	// ten million events; -1: only the disk bounds them). A spool at its
	// bound takes no more: events wait in memory, as when the disk is
	// full (the hold stays, /readyz fails once the queue is half full,
	// and a full queue makes calls wait), until Kafka takes them.
	SpoolMaxBytes int64 `yaml:"spool_max_bytes"`
	// EventLinger is how long the producer waits to fill a Kafka write
	// with more events. Longer means fewer, larger produce requests (less
	// CPU on the edge and the brokers) and a slightly longer window of
	// answered calls whose events are still in memory.
	EventLinger time.Duration `yaml:"event_linger"`
	// EventQueueSize bounds the events held in memory on their way to
	// Kafka or the spool (default 65,536); when it is full a call waits to
	// queue its event rather than drop it. It is also the hard bound on
	// what a kill -9 loses: at most this many events, one batch being
	// written (1,000) and the calls whose event is still being queued.
	EventQueueSize int `yaml:"event_queue_size"`
	// MaxEventAge is how old an event POST /v1/events takes may be (default
	// 34 days). Older ones are refused at once, per item: ingest would set
	// them aside as too late to count (ingest.max_lateness, 35 days by
	// default), and the day between leaves room for a stay in the spool.
	MaxEventAge time.Duration `yaml:"max_event_age"`
	// QuotaTimezone: "utc" (default) counts calendar months in UTC,
	// "account" in the account's own time zone.
	QuotaTimezone string `yaml:"quota_timezone"`
	// CORS lets pages on other origins call the API (off by default).
	CORS CORSConfig `yaml:"cors"`
	// TrustedProxies are the addresses and CIDR ranges of the proxies in
	// front of the edge and its admin API (a TLS load balancer) whose
	// X-Forwarded-For it believes for the audit log's remote address.
	// Empty: the address the connection came from, whatever the header
	// says.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// DefaultMaxEventAge is Config.MaxEventAge's default: a day under ingest's
// default lateness.
const DefaultMaxEventAge = 34 * 24 * time.Hour

// DefaultPlans are the tier limits used when the plans table does not
// define the account's plan; they match the seeded version-1 tiers.
func DefaultPlans() map[string]Plan {
	free := int64(1000)
	up := "https://tollgate.dev/pricing"
	return map[string]Plan{
		"free":       {ID: "free", Limits: Limits{RequestsPerSecond: 5, Burst: 10, MonthlyRequests: &free}, UpgradeURL: up},
		"starter":    {ID: "starter", Limits: Limits{RequestsPerSecond: 20, Burst: 40}, UpgradeURL: up},
		"growth":     {ID: "growth", Limits: Limits{RequestsPerSecond: 100, Burst: 200}, UpgradeURL: up},
		"enterprise": {ID: "enterprise", Limits: Limits{RequestsPerSecond: 1000, Burst: 2000}, UpgradeURL: up},
	}
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if len(c.TrustedProxies) == 0 {
		c.TrustedProxies = nil // written [] or left out: none
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8080"
	}
	if c.UpgradeProtocols == nil {
		c.UpgradeProtocols = []string{"websocket"}
	}
	if c.UpstreamIdleTimeout == 0 {
		c.UpstreamIdleTimeout = time.Second
	}
	if c.UpstreamMaxConns == 0 {
		c.UpstreamMaxConns = 1024
	}
	if c.UpstreamTimeout == 0 {
		c.UpstreamTimeout = 30 * time.Second
	}
	if c.MaxUpgradedConnections == 0 {
		c.MaxUpgradedConnections = 10000
	}
	if c.UpgradedIdleTimeout == 0 {
		c.UpgradedIdleTimeout = 5 * time.Minute
	}
	if c.EventType == "" {
		c.EventType = "api_call"
	}
	if c.EventLinger == 0 {
		c.EventLinger = 10 * time.Millisecond
	}
	if c.EventQueueSize == 0 {
		c.EventQueueSize = 65536
	}
	if c.SpoolMaxBytes == 0 {
		c.SpoolMaxBytes = 4 << 30
	}
	if c.KeyLookupTimeout == 0 {
		c.KeyLookupTimeout = DefaultKeyLookupTimeout
	}
	if c.KeyCacheTTL == 0 {
		c.KeyCacheTTL = 30 * time.Second
	}
	if c.RateLimitPrefix == "" {
		c.RateLimitPrefix = "tollgate:"
	}
	if c.ExpectedInstances == 0 {
		c.ExpectedInstances = 1
	}
	if c.QuotaTimezone == "" {
		c.QuotaTimezone = "utc"
	}
	if c.MaxEventAge == 0 {
		c.MaxEventAge = DefaultMaxEventAge
	}
	c.CORS.defaults()
	def := DefaultPlans()
	if c.Plans == nil {
		c.Plans = map[string]Plan{}
	}
	for id, p := range def {
		if _, ok := c.Plans[id]; !ok {
			c.Plans[id] = p
		}
	}
	for id, p := range c.Plans {
		p.ID = id // the map key names the plan; an id inside is not read
		c.Plans[id] = p
	}
}

// Validate reports every problem with the configuration at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("edge.listen: required"))
	}
	for name, u := range map[string]string{"edge.upstream": c.Upstream, "edge.sandbox_upstream": c.SandboxUpstream} {
		if u == "" && name == "edge.sandbox_upstream" {
			continue
		}
		p, err := url.Parse(u)
		switch {
		case err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "":
			errs = append(errs, fmt.Errorf("%s: want an http(s) URL, got %q", name, redact.URL(u)))
		case p.User != nil || redact.HasUserInfo(u):
			// Neither front sends them: the upstream would get calls
			// without the credentials the operator meant it to.
			errs = append(errs, fmt.Errorf("%s: %q carries credentials, which the edge does not send to the upstream; "+
				"use upstream_client_cert_file and upstream_client_key_file, or have the upstream trust the edge's address", name, redact.URL(u)))
		}
	}
	if c.UpstreamCAFile != "" || c.UpstreamClientCertFile != "" || c.UpstreamClientKeyFile != "" {
		if _, err := c.UpstreamTLS(); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := c.ServerTLS(); err != nil {
		errs = append(errs, err)
	}
	if problem := schemas.TypeProblem(c.EventType); problem != "" {
		// Every call's event would be dead-lettered by ingest, and so
		// never counted or billed.
		errs = append(errs, fmt.Errorf("edge.event_type: %q: %s", c.EventType, problem))
	}
	if c.UpstreamTimeout < 0 {
		errs = append(errs, errors.New("edge.upstream_timeout: negative"))
	}
	for _, p := range c.UpgradeProtocols {
		if p == "" || strings.ContainsAny(p, " ,/\t") {
			errs = append(errs, fmt.Errorf("edge.upgrade_protocols: %q is not a protocol name (websocket, say)", p))
		}
	}
	if c.UpstreamIdleTimeout < 0 || c.UpstreamIdleTimeout > time.Hour {
		errs = append(errs, fmt.Errorf("edge.upstream_idle_timeout: between 0 and 1h, got %s", c.UpstreamIdleTimeout))
	}
	if c.UpstreamMaxConns < 0 {
		errs = append(errs, fmt.Errorf("edge.upstream_max_conns: at least 1, got %d", c.UpstreamMaxConns))
	}
	if c.MaxUpgradedConnections < 0 {
		errs = append(errs, errors.New("edge.max_upgraded_connections: negative"))
	}
	if c.UpgradedIdleTimeout < time.Second {
		errs = append(errs, fmt.Errorf("edge.upgraded_idle_timeout: at least 1s, got %s", c.UpgradedIdleTimeout))
	}
	if c.AdminListen != "" {
		if b, err := hex.DecodeString(c.AdminTokenSHA256); err != nil || len(b) != 32 {
			errs = append(errs, errors.New("edge.admin_token_sha256: want 64 hex characters (sha256 of the admin token) when edge.admin_listen is set"))
		}
	}
	if c.MaxEventAge < time.Hour {
		errs = append(errs, fmt.Errorf("edge.max_event_age: at least 1h, got %s", c.MaxEventAge))
	}
	if c.EventLinger < 0 || c.EventLinger > time.Second {
		errs = append(errs, errors.New("edge.event_linger: must be between 0 and 1s"))
	}
	if c.EventQueueSize < 1 || c.EventQueueSize > 16<<20 {
		errs = append(errs, fmt.Errorf("edge.event_queue_size: between 1 and 16,777,216, got %d", c.EventQueueSize))
	}
	if c.SpoolMaxBytes != -1 && c.SpoolMaxBytes < 16<<20 {
		errs = append(errs, fmt.Errorf("edge.spool_max_bytes: at least 16,777,216 (16 MiB), or -1 for no bound but the disk's, got %d", c.SpoolMaxBytes))
	}
	if err := c.CORS.validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := ParseTrustedProxies("edge.trusted_proxies", c.TrustedProxies); err != nil {
		errs = append(errs, err)
	}
	if c.KeyLookupTimeout < 100*time.Millisecond || c.KeyLookupTimeout > time.Minute {
		errs = append(errs, fmt.Errorf("edge.key_lookup_timeout: %s; must be between 100ms and 1m", c.KeyLookupTimeout))
	}
	if c.KeyCacheTTL < 0 {
		errs = append(errs, errors.New("edge.key_cache_ttl: negative"))
	}
	if c.ExpectedInstances < 1 {
		errs = append(errs, errors.New("edge.expected_instances: must be at least 1"))
	}
	if c.QuotaTimezone != "utc" && c.QuotaTimezone != "account" {
		errs = append(errs, fmt.Errorf("edge.quota_timezone: want utc or account, got %q", c.QuotaTimezone))
	}
	if _, ok := c.Plans["free"]; !ok {
		errs = append(errs, errors.New("edge.plans: the free plan must be defined"))
	}
	for id, p := range c.Plans {
		if p.Limits.RequestsPerSecond <= 0 || p.Limits.Burst <= 0 {
			errs = append(errs, fmt.Errorf("edge.plans.%s.limits: requests_per_second and burst must be positive", id))
		}
	}
	if _, err := NewRouter(c.Routes); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// maxDial is the longest a connection to the upstream may take to open,
// when upstream_timeout is longer.
const maxDial = 5 * time.Second

// UpstreamDialTimeout bounds opening a connection to the upstream:
// upstream_timeout, or 5 s when that is longer. An upstream that never
// completes the connection is a silence like any other, so it never
// holds a call past upstream_timeout; and one that cannot be reached is
// told in seconds, not in a long upstream_timeout.
func (c *Config) UpstreamDialTimeout() time.Duration {
	return min(c.UpstreamTimeout, maxDial)
}

// UpstreamTLS is the TLS configuration for https upstreams: the system's
// roots, plus UpstreamCAFile's when set, and the client certificate when
// UpstreamClientCertFile and UpstreamClientKeyFile are set.
func (c *Config) UpstreamTLS() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	switch {
	case c.UpstreamClientCertFile != "" && c.UpstreamClientKeyFile != "":
		cert, err := tls.LoadX509KeyPair(c.UpstreamClientCertFile, c.UpstreamClientKeyFile)
		if err != nil {
			return nil, fmt.Errorf("edge.upstream_client_cert_file and edge.upstream_client_key_file: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case c.UpstreamClientCertFile != "" || c.UpstreamClientKeyFile != "":
		return nil, errors.New("edge.upstream_client_cert_file and edge.upstream_client_key_file: set both or neither")
	}
	if c.UpstreamCAFile == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(c.UpstreamCAFile)
	if err != nil {
		return nil, fmt.Errorf("edge.upstream_ca_file: %w", err)
	}
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("edge.upstream_ca_file: no PEM certificate in %s", c.UpstreamCAFile)
	}
	cfg.RootCAs = roots
	return cfg, nil
}

// ServerTLS is the TLS configuration the edge serves HTTPS with, or nil
// when TLSCertFile and TLSKeyFile are both empty.
func (c *Config) ServerTLS() (*tls.Config, error) {
	if c.TLSCertFile == "" && c.TLSKeyFile == "" {
		return nil, nil
	}
	if c.TLSCertFile == "" || c.TLSKeyFile == "" {
		return nil, errors.New("edge.tls_cert_file and edge.tls_key_file: set both or neither")
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("edge.tls_cert_file / edge.tls_key_file: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}, nil
}
