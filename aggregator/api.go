package aggregator

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Config is the aggregator's configuration.
type Config struct {
	// Listen is the usage API's address (and /admin/v1/meters).
	Listen string `yaml:"listen"`
	// MetricsListen, when set, serves Prometheus /metrics on an address
	// of its own: the usage API's listener faces API consumers and their
	// browsers, and the process's metrics are the operator's.
	MetricsListen string `yaml:"metrics_listen"`
	// AdminTokenSHA256 is the hex SHA-256 of the admin bearer token; empty
	// disables the admin API.
	AdminTokenSHA256 string `yaml:"admin_token_sha256"`
	// CORSOrigins may call the usage API from a browser (with a
	// publishable key).
	CORSOrigins []string `yaml:"cors_origins"`
	// MetersRefresh is how often meters created through the admin API are
	// re-read.
	MetersRefresh time.Duration `yaml:"meters_refresh"`
	// ZoneCacheTTL is how long an account's time zone is cached.
	ZoneCacheTTL time.Duration `yaml:"zone_cache_ttl"`
	// MaxPageSize bounds limit= on list endpoints.
	MaxPageSize int `yaml:"max_page_size"`
	// RequestLogWindow is how far back GET /v1/requests looks by default.
	RequestLogWindow time.Duration `yaml:"request_log_window"`
	// TrustedProxies are the addresses and CIDR ranges of the proxies in
	// front of the usage API (the dashboard, a load balancer) whose
	// X-Forwarded-For it believes for the audit log's remote address.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if len(c.TrustedProxies) == 0 {
		c.TrustedProxies = nil // written [] or left out: none
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8081"
	}
	if len(c.CORSOrigins) == 0 {
		c.CORSOrigins = []string{"*"}
	}
	if c.MetersRefresh == 0 {
		c.MetersRefresh = 5 * time.Second
	}
	if c.ZoneCacheTTL == 0 {
		c.ZoneCacheTTL = time.Minute
	}
	if c.MaxPageSize == 0 {
		c.MaxPageSize = 1000
	}
	if c.RequestLogWindow == 0 {
		c.RequestLogWindow = 7 * 24 * time.Hour
	}
}

// corsOriginMayMatch reports whether an aggregator.cors_origins entry can
// match a browser's Origin: "*", an origin, or a pattern with echo's
// wildcards (* and ?, anywhere: http://localhost:*, https://*.example.com)
// that has a scheme and nothing after its host and port, in lower case,
// with no space or user. An entry with a path never matches, and the
// dashboard's calls would be refused without a word; one without a scheme
// is refused too, though one that starts with * may match.
func corsOriginMayMatch(o string) bool {
	if o == "*" {
		return true
	}
	// Browsers send an origin in lower case, with no space, user or path.
	if o != strings.ToLower(o) || strings.ContainsAny(o, " \t@") {
		return false
	}
	if edge.IsOrigin(o) {
		return true
	}
	if !strings.ContainsAny(o, "*?") {
		return false
	}
	scheme, rest, ok := strings.Cut(o, "://")
	return ok && scheme != "" && rest != "" && !strings.ContainsAny(rest, "/#")
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("aggregator.listen: required"))
	}
	if c.AdminTokenSHA256 != "" {
		if b, err := hex.DecodeString(c.AdminTokenSHA256); err != nil || len(b) != sha256.Size {
			errs = append(errs, errors.New("aggregator.admin_token_sha256: want 64 hex characters (sha256sum of the token)"))
		}
	}
	if c.MetersRefresh <= 0 {
		errs = append(errs, errors.New("aggregator.meters_refresh: must be positive"))
	}
	if c.ZoneCacheTTL <= 0 {
		errs = append(errs, errors.New("aggregator.zone_cache_ttl: must be positive"))
	}
	if c.MaxPageSize <= 0 {
		errs = append(errs, errors.New("aggregator.max_page_size: must be positive"))
	}
	if c.RequestLogWindow <= 0 {
		errs = append(errs, errors.New("aggregator.request_log_window: must be positive"))
	}
	if _, err := edge.ParseTrustedProxies("aggregator.trusted_proxies", c.TrustedProxies); err != nil {
		errs = append(errs, err)
	}
	for _, o := range c.CORSOrigins {
		if !corsOriginMayMatch(o) {
			errs = append(errs, fmt.Errorf("aggregator.cors_origins: %q never matches a browser's origin (scheme://host[:port], nothing after; * and ? are wildcards)", o))
		}
	}
	return errors.Join(errs...)
}

// KeyStore finds API keys by the hash of their secret; edge/postgres
// implements it.
type KeyStore interface {
	KeyByHash(ctx context.Context, hash [32]byte) (edge.Key, error)
}

// ServerDeps are the usage API's collaborators.
type ServerDeps struct {
	Keys    KeyStore
	Usage   UsageStore
	Catalog *Catalog
	Zones   Zones
	// Holds are the edges' spool holds (Postgres), which cap
	// complete_through as they cap the invoicer's gate. Without them the
	// usage API leaves complete_through out: the watermark alone would call
	// usage complete while events spooled at an edge are still to land.
	Holds SpoolHolds
	// Backfill, when set, is started for a newly created meter so its
	// rollups cover events that landed before it existed.
	Backfill func(m meter.Meter)
	// PastRollups tells which meters' past is still being rolled up, for
	// the usage response's backfilling flag. Without it nothing is
	// reported as backfilling.
	PastRollups PastRollups
	// Rezones tells which accounts' hour, day and month rollups are owed a
	// re-roll onto a new time zone, for the usage response's rezoning
	// flag. Without it nothing is reported as rezoning.
	Rezones Rezones
	// Auditor records failed authentications, as the edge's; nil records
	// none.
	Auditor edge.Auditor
	// Ready reports whether the usage API can serve (its /readyz); nil is
	// always ready.
	Ready func(context.Context) error
	// Registerer takes the usage API's request metrics (nil: kept, not
	// served).
	Registerer prometheus.Registerer
	Log        *slog.Logger
}

// PastRollups knows which meters' rollups do not yet cover the events
// that landed before the meter was counted: a meter created through the
// admin API until its backfill is recorded finished, and a configuration
// file's meter that is new or changed until its roll-up is recorded.
// aggregator/postgres implements it.
type PastRollups interface {
	// Unfinished returns those meters' keys; config is the configuration
	// file's meters, which take precedence over stored ones with their key.
	Unfinished(ctx context.Context, config []meter.Meter) (map[string]bool, error)
}

// Rezones knows the accounts whose time zone changed since their hour, day
// and month rollups were last re-rolled onto it (Rezone);
// aggregator/postgres implements it.
type Rezones interface {
	Rezoning(ctx context.Context) (map[string]bool, error)
}

// Server is the usage API and the meters admin API.
type Server struct {
	cfg       Config
	d         ServerDeps
	tokenHash []byte
	// trusted are aggregator.trusted_proxies.
	trusted edge.TrustedProxies
	now     func() time.Time
	e       *echo.Echo
	status  *statusCache
}

// NewServer builds the HTTP handler; cfg is defaulted and validated.
func NewServer(cfg Config, d ServerDeps) (*Server, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	d.Zones = checkZones(d.Zones, d.Usage, d.Log)
	s := &Server{cfg: cfg, d: d, now: time.Now}
	s.status = newStatusCache(d.Usage, d.Holds, func() time.Time { return s.now() })
	s.status.past = d.PastRollups
	s.status.rezones = d.Rezones
	if cfg.AdminTokenSHA256 != "" {
		s.tokenHash, _ = hex.DecodeString(cfg.AdminTokenSHA256)
	}
	s.trusted, _ = edge.ParseTrustedProxies("aggregator.trusted_proxies", cfg.TrustedProxies) // validated above
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.handleError
	metrics, err := newAPIMetrics(d.Registerer)
	if err != nil {
		return nil, err
	}
	e.Use(metrics.middleware)
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			c.Response().Header().Set(edge.HeaderRequestID, edge.RequestIDFor(schemas.NewEventID()))
			return next(c)
		}
	})
	e.GET("/healthz", func(c echo.Context) error { return c.String(http.StatusOK, "ok\n") })
	e.GET("/readyz", s.readyz)
	v1 := e.Group("/v1", middleware.CORSWithConfig(middleware.CORSConfig{
		AllowOrigins:  cfg.CORSOrigins,
		AllowMethods:  []string{http.MethodGet, http.MethodOptions},
		AllowHeaders:  []string{echo.HeaderAuthorization, echo.HeaderContentType},
		ExposeHeaders: []string{edge.HeaderRequestID},
		MaxAge:        600,
	}), s.authKey, noStore)
	v1.GET("/usage", s.usage)
	v1.GET("/requests", s.requests)
	v1.GET("/meters", s.listMetersPublic)
	admin := e.Group("/admin/v1", s.authAdmin)
	admin.GET("/meters", s.listMeters)
	admin.POST("/meters", s.createMeter)
	edge.RefuseUnknownMethods(e)
	edge.RefuseOtherMethods(e, map[string]string{"/healthz": http.MethodGet, "/readyz": http.MethodGet})
	edge.RefuseOtherMethods(v1, map[string]string{"/usage": http.MethodGet, "/requests": http.MethodGet, "/meters": http.MethodGet})
	edge.RefuseOtherMethods(admin, map[string]string{"/meters": http.MethodGet + ", " + http.MethodPost})
	s.e = e
	return s, nil
}

// Handler is the HTTP handler.
func (s *Server) Handler() http.Handler { return s.e }

const keyCtx = "tollgate.key"

// UsageScope is the scope every read of the usage API needs.
const UsageScope = "usage:read"

func (s *Server) authKey(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if c.Request().Method == http.MethodOptions {
			return next(c)
		}
		r := c.Request()
		// "Bearer <key>" or basic auth's user name, as the edge takes it.
		k, err := edge.AuthenticateKey(r.Context(), s.d.Keys, edge.Bearer(r), s.now(), s.d.Auditor, "usage_api", s.trusted.RequestClientAddr(r))
		if err != nil {
			return err
		}
		// Reading usage takes the usage:read scope, which a key created
		// without scopes has (a secret key everything, a publishable one
		// every read scope); a key restricted to other scopes reads nothing.
		if !edge.HasScope(k.Kind, k.Scopes, UsageScope) {
			ae := edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "insufficient_scope",
				fmt.Sprintf("This key lacks the %q scope needed to read usage.", UsageScope))
			ae.Scope = UsageScope
			return ae
		}
		c.Set(keyCtx, k)
		return next(c)
	}
}

func (s *Server) authAdmin(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if s.tokenHash == nil {
			return edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "admin_api_disabled",
				"The meters admin API is disabled: set aggregator.admin_token_sha256.")
		}
		// The scheme's case does not matter (RFC 9110), as at the edge's
		// admin API.
		h := c.Request().Header.Get(echo.HeaderAuthorization)
		ok := len(h) > 7 && strings.EqualFold(h[:7], "bearer ")
		var tok string
		if ok {
			tok = strings.TrimSpace(h[7:])
		}
		sum := sha256.Sum256([]byte(tok))
		if !ok || subtle.ConstantTimeCompare(sum[:], s.tokenHash) != 1 {
			// Recorded as the edge's admin API records its own: this one
			// is on the usage API's port, which browsers reach.
			if s.d.Auditor != nil {
				reason := "wrong admin token"
				if !ok || tok == "" {
					reason = "no admin token"
				}
				s.d.Auditor.Record(edge.AuditEvent{At: s.now(), Actor: "meters_admin", Action: edge.ActionAdminAuth,
					RemoteAddr: s.trusted.RequestClientAddr(c.Request()), Reason: reason, Count: 1})
			}
			return edge.NewAPIError(http.StatusUnauthorized, edge.TypeAuthentication, "invalid_admin_token",
				"The admin token is missing or wrong.")
		}
		return next(c)
	}
}

// readyz answers 200 when the usage API's dependencies answer, else 503;
// the cause goes to the log, not to the caller (the port faces browsers).
func (s *Server) readyz(c echo.Context) error {
	if s.d.Ready != nil {
		if err := s.d.Ready(c.Request().Context()); err != nil {
			s.d.Log.Warn("not ready", "err", err)
			return edge.NewAPIError(http.StatusServiceUnavailable, edge.TypeAPI, "not_ready",
				"a dependency of the usage API is unavailable; see its log")
		}
	}
	return c.String(http.StatusOK, "ready\n")
}

func invalid(code, msg string, args ...any) error {
	return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, code, fmt.Sprintf(msg, args...))
}

// usageResponse is GET /v1/usage's body.
type usageResponse struct {
	Object          string      `json:"object"`
	Meter           string      `json:"meter"`
	Aggregation     string      `json:"aggregation"`
	Window          Granularity `json:"window"`
	TimeZone        string      `json:"time_zone"`
	From            time.Time   `json:"from"`
	To              time.Time   `json:"to"`
	GroupBy         []string    `json:"group_by"`
	Data            []usageItem `json:"data"`
	HasMore         bool        `json:"has_more"`
	NextCursor      string      `json:"next_cursor,omitempty"`
	CompleteThrough *time.Time  `json:"complete_through,omitempty"`
	// Rezoning is true while the account's hour, day and month windows are
	// owed a re-roll onto its new time zone: until it is done they can
	// hold rows on both zones' grids, or none; complete_through is left
	// out.
	Rezoning bool `json:"rezoning,omitempty"`
	// Backfilling is true while the meter's past is still being rolled up
	// from the raw events: its windows may read empty or short, and
	// complete_through is left out.
	Backfilling   bool   `json:"backfilling,omitempty"`
	TooLateEvents uint64 `json:"too_late_events"`
}

type usageItem struct {
	WindowStart time.Time         `json:"window_start"`
	WindowEnd   time.Time         `json:"window_end"`
	Group       map[string]string `json:"group,omitempty"`
	Value       int64             `json:"value"`
	// Overflow marks a SUM past int64: value is then int64's largest (or
	// smallest) value, not the total (meter.SaturatingSum).
	Overflow bool `json:"overflow,omitempty"`
}

// maxRange bounds to − from for each window, so one request cannot make
// ClickHouse read and sort years of minute rows: about 10,000 windows of
// minutes, 2,200 of hours, 3,700 of days, and 100 years of months.
var maxRange = map[Granularity]time.Duration{
	Minute: 7 * 24 * time.Hour, Hour: 93 * 24 * time.Hour, Day: 3660 * 24 * time.Hour, Month: 36525 * 24 * time.Hour,
}

var maxRangeText = map[Granularity]string{Minute: "7 days", Hour: "93 days", Day: "3,660 days", Month: "100 years"}

// noStore keeps an account's usage and request log out of the caches
// between the API and its caller, the browser's on-disk one above all.
func noStore(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Response().Header().Set("Cache-Control", "no-store")
		return next(c)
	}
}

// ceilSecond is t moved up to a whole second.
func ceilSecond(t time.Time) time.Time {
	if c := t.Truncate(time.Second); !c.Equal(t) {
		return c.Add(time.Second)
	}
	return t
}

// inDateTime reports whether t is within what ClickHouse's DateTime holds
// here (1970 to 2105; past it ClickHouse 18.16 wraps values around).
func inDateTime(t time.Time) bool {
	return !t.Before(time.Unix(0, 0)) && t.Before(allTime)
}

// defaultRange is how far back from= defaults for each window.
var defaultRange = map[Granularity]time.Duration{
	Minute: time.Hour, Hour: 24 * time.Hour, Day: 31 * 24 * time.Hour, Month: 366 * 24 * time.Hour,
}

func (s *Server) usage(c echo.Context) error {
	ctx := c.Request().Context()
	k := c.Get(keyCtx).(edge.Key)
	q := c.QueryParams()
	key := q.Get("meter")
	if key == "" {
		key = meter.Default().Key
	}
	m, err := s.d.Catalog.Get(ctx, key)
	if err != nil {
		return err
	}
	g := Day
	if w := q.Get("window"); w != "" {
		if g, err = ParseGranularity(w); err != nil {
			return invalid("invalid_window", "%v", err)
		}
	}
	var groupBy []string
	if v := q.Get("group_by"); v != "" {
		groupBy = strings.Split(v, ",")
	}
	// The fingerprint covers the parameters as given. A range left to its
	// default (up to now) is fixed by the first page and carried in the
	// cursor, so later pages read the same range however much later they
	// are asked for.
	fp := fingerprint(k.AccountID, string(k.Environment), m.Key, string(g), q.Get("from"), q.Get("to"), strings.Join(groupBy, ","))
	var cur cursor
	if v := q.Get("cursor"); v != "" {
		if cur, err = parseCursor(v, fp); err != nil {
			return err
		}
	}
	to := s.now().UTC()
	if cur.To != 0 {
		to = time.UnixMicro(cur.To).UTC()
	}
	if v := q.Get("to"); v != "" {
		if to, err = time.Parse(time.RFC3339, v); err != nil {
			return invalid("invalid_time", "to: want an RFC 3339 time such as 2026-01-31T00:00:00Z")
		}
	}
	from := to.Add(-defaultRange[g])
	if cur.From != 0 {
		from = time.UnixMicro(cur.From).UTC()
	}
	if v := q.Get("from"); v != "" {
		if from, err = time.Parse(time.RFC3339, v); err != nil {
			return invalid("invalid_time", "from: want an RFC 3339 time such as 2026-01-01T00:00:00Z")
		}
	}
	if !inDateTime(from) || !inDateTime(to) {
		return invalid("invalid_time", "from and to must be between 1970-01-01T00:00:00Z and 2105-01-01T00:00:00Z")
	}
	if !from.Before(to) {
		return invalid("invalid_time_range", "from must be before to")
	}
	if to.Sub(from) > maxRange[g] {
		return invalid("invalid_time_range", "a %s window can be asked for over at most %s; ask for a coarser window or a shorter range", g, maxRangeText[g])
	}
	// Windows start on whole seconds (whole minutes, in fact), and the
	// store binds whole seconds: a fractional bound is moved up to the
	// next second, which picks the same windows (start >= from, start <
	// to). Cut down instead, from=…:00.5 took in the window starting at
	// :00, which starts before it, and to=…:00.5 left that window out.
	from, to = ceilSecond(from), ceilSecond(to)
	limit, err := s.limit(q.Get("limit"), 100)
	if err != nil {
		return err
	}
	uq := UsageQuery{Account: k.AccountID, Environment: string(k.Environment), Meter: m.Key, Granularity: g,
		From: from.UTC(), To: to.UTC(), Limit: limit + 1}
	if cur.K {
		// Cursors are not signed: group values no row of this meter could
		// have would only make the query too large for ClickHouse (a 500).
		if len(cur.G) > len(m.GroupBy) || slices.ContainsFunc(cur.G, func(v string) bool { return len(v) > schemas.MaxDimensionValue }) {
			return invalid("invalid_cursor", "cursor: not a cursor this query returned; repeat the query without it")
		}
		uq.After = &UsageRow{WindowStart: time.UnixMicro(cur.W).UTC(), Group: cur.G}
	}
	if len(groupBy) > 0 {
		if err := pickGroups(m, groupBy, &uq); err != nil {
			return err
		}
	}
	// Whether the account's coarser windows are being re-rolled is read
	// before the rows: a "no" up to statusTTL old always comes before a
	// rezone's deletion (its first pass waits at least 2 s), so rows read
	// after it are whole. Read after, a pass could delete rows under the
	// read and finish before the answer said so.
	rezoning, rerr := false, error(nil)
	if g != Minute {
		if rezoning, rerr = s.status.Rezoning(ctx, k.AccountID); rerr != nil {
			s.d.Log.Warn("complete_through left out of a usage response: the accounts' time zone re-rolls cannot be read", "err", rerr)
		}
	}
	rows, err := s.d.Usage.Usage(ctx, uq)
	if err != nil {
		return err
	}
	zones, err := s.d.Zones.Zones(ctx, []string{k.AccountID})
	if err != nil {
		return err
	}
	loc, err := LoadZone(zones[k.AccountID])
	if err != nil {
		return err
	}
	resp := usageResponse{Object: "usage", Meter: m.Key, Aggregation: string(m.Aggregation), Window: g,
		TimeZone: loc.String(), From: from.UTC(), To: to.UTC(), GroupBy: groupBy, Data: []usageItem{}}
	if resp.GroupBy == nil {
		resp.GroupBy = []string{}
	}
	if len(rows) > limit {
		rows = rows[:limit]
		resp.HasMore = true
		last := rows[limit-1]
		resp.NextCursor = encodeCursorValue(cursor{K: true, W: last.WindowStart.UnixMicro(), G: last.Group,
			From: from.UnixMicro(), To: to.UnixMicro(), FP: fp})
	}
	for _, r := range rows {
		it := usageItem{WindowStart: r.WindowStart.UTC(), WindowEnd: WindowEnd(r.WindowStart, g, loc), Value: r.Value,
			Overflow: m.Aggregation == meter.Sum && meter.Overflowed(r.Value)}
		if len(groupBy) > 0 && len(r.Group) == len(groupBy) {
			it.Group = make(map[string]string, len(groupBy))
			for i, name := range groupBy {
				it.Group[name] = r.Group[i]
			}
		}
		resp.Data = append(resp.Data, it)
	}
	// complete_through is left out when it cannot be read: the usage
	// itself is still exact, and a missing status only understates it.
	// While the meter is backfilling, or the account's hour, day and month
	// windows are owed a re-roll onto its new zone, those windows are not
	// complete at all, whatever has landed; when either cannot be read,
	// complete_through is left out too.
	unfinished, err := s.status.Backfilling(ctx, s.d.Catalog.config, m.Key)
	if err != nil {
		s.d.Log.Warn("complete_through left out of a usage response: the meters' backfill state cannot be read", "err", err)
	}
	if rerr != nil {
		err = rerr
	}
	resp.Backfilling, resp.Rezoning = unfinished, rezoning
	switch {
	case err != nil, unfinished, rezoning:
	default:
		if w, ok, err := s.status.CompleteThrough(ctx); err != nil {
			s.d.Log.Warn("complete_through left out of a usage response", "err", err)
		} else if ok {
			resp.CompleteThrough = &w
		}
	}
	if resp.TooLateEvents, err = s.status.TooLate(ctx, k.AccountID, string(k.Environment), from, to); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, resp)
}

// pickGroups maps group_by= onto the meter's group_by. The full list in the
// meter's order reads the grouped rows as they are; in another order (the
// response names columns in request order) or a subset, they are picked
// and combined, a subset only for additive and max meters, since a
// unique count or a latest value cannot be combined from its parts.
func pickGroups(m meter.Meter, groupBy []string, uq *UsageQuery) error {
	pos := map[string]int{}
	for i, g := range m.GroupBy {
		pos[g] = i
	}
	seen := map[string]bool{}
	picks := make([]int, 0, len(groupBy))
	for _, g := range groupBy {
		i, ok := pos[g]
		if !ok {
			return invalid("invalid_group_by", "meter %q cannot be grouped by %q (it groups by %s)", m.Key, g, describe(m.GroupBy))
		}
		if seen[g] {
			return invalid("invalid_group_by", "group_by names %q twice", g)
		}
		seen[g] = true
		picks = append(picks, i)
	}
	uq.Grouped = true
	identity := len(picks) == len(m.GroupBy)
	for i, p := range picks {
		if p != i {
			identity = false
		}
	}
	if identity {
		return nil
	}
	uq.Pick, uq.Combine = picks, m.Rollup()
	if uq.Combine == "" && len(picks) == len(m.GroupBy) {
		// Every dimension in another order: each group is still one
		// rollup row a window, which any combination returns as it is.
		uq.Combine = "max"
	}
	if uq.Combine == "" {
		return invalid("invalid_group_by", "meter %q (%s) can be read by all of its group_by (%s) or none, not a part",
			m.Key, m.Aggregation, strings.Join(m.GroupBy, ","))
	}
	return nil
}

func describe(gs []string) string {
	if len(gs) == 0 {
		return "nothing"
	}
	return strings.Join(gs, ", ")
}

func (s *Server) limit(v string, def int) (int, error) {
	if v == "" {
		return min(def, s.cfg.MaxPageSize), nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		return 0, invalid("invalid_limit", "limit: want a whole number, 1 or more")
	}
	// A limit over the maximum is served as the maximum: a client follows
	// next_cursor either way, and one written against the default maximum
	// (the dashboard asks for 1,000) keeps working where an operator set a
	// smaller one.
	return min(n, s.cfg.MaxPageSize), nil
}

// Cursors are opaque to clients: base64url JSON holding the position and a
// fingerprint of the query, so a cursor cannot be reused with other
// parameters (or by another account) to read something else.
type cursor struct {
	// W and G are the last usage row a page returned (its window start in
	// Unix microseconds, and its group values); K says they are set.
	K      bool     `json:"k,omitempty"`
	W      int64    `json:"w,omitempty"`
	G      []string `json:"g,omitempty"`
	Micros uint64   `json:"t,omitempty"`
	ID     string   `json:"i,omitempty"`
	// Type is the last request log row's event type: one event id and
	// time can be two rows, of two types.
	Type string `json:"y,omitempty"`
	// From and To are the range (Unix microseconds) the first page read,
	// for pages of a query that left it to its default.
	From int64  `json:"a,omitempty"`
	To   int64  `json:"b,omitempty"`
	FP   string `json:"f"`
}

// cursorLife is how long past the request log's window a page's cursor
// may still reach back: a client paging for longer starts again.
const cursorLife = time.Hour

func fingerprint(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return base64.RawURLEncoding.EncodeToString(h[:9])
}

func encodeCursorValue(c cursor) string {
	b, _ := json.Marshal(c)
	return base64.RawURLEncoding.EncodeToString(b)
}

func parseCursor(v, fp string) (cursor, error) {
	var c cursor
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil || c.FP != fp || !inDateTime(time.UnixMicro(c.From)) || !inDateTime(time.UnixMicro(c.To)) || !inDateTime(time.UnixMicro(c.W)) {
		return cursor{}, invalid("invalid_cursor", "cursor: not a cursor this query returned; repeat the query without it")
	}
	return c, nil
}

type requestsResponse struct {
	Object     string       `json:"object"`
	KeyID      string       `json:"key_id"`
	Data       []RequestRow `json:"data"`
	HasMore    bool         `json:"has_more"`
	NextCursor string       `json:"next_cursor,omitempty"`
}

// requests is the calling key's own request log, newest first. A
// publishable key is public, and its log would show every visitor's calls
// to whoever has it, so only a secret key reads its log.
func (s *Server) requests(c echo.Context) error {
	ctx := c.Request().Context()
	k := c.Get(keyCtx).(edge.Key)
	if k.Kind != edge.Secret {
		return edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "secret_key_required",
			"The request log is read with a secret key (sk_…): a publishable key is public, and its log would show every caller's calls.")
	}
	q := c.QueryParams()
	limit, err := s.limit(q.Get("limit"), 50)
	if err != nil {
		return err
	}
	// As for usage: a defaulted since is fixed by the first page and
	// carried in the cursor.
	fp := fingerprint(k.AccountID, k.ID, q.Get("since"))
	var cur cursor
	if v := q.Get("cursor"); v != "" {
		if cur, err = parseCursor(v, fp); err != nil {
			return err
		}
	}
	since := s.now().Add(-s.cfg.RequestLogWindow)
	if cur.From != 0 {
		since = time.UnixMicro(cur.From)
	}
	if v := q.Get("since"); v != "" {
		if since, err = time.Parse(time.RFC3339, v); err != nil {
			return invalid("invalid_time", "since: want an RFC 3339 time")
		}
	}
	if !inDateTime(since) {
		return invalid("invalid_time", "since must be between 1970-01-01T00:00:00Z and 2105-01-01T00:00:00Z")
	}
	// An explicit since may reach back as far as the window. Later pages
	// carry the first page's since, which the window's start passes as
	// time goes on: they may reach back cursorLife further, no more. A
	// cursor is not signed, so this bound is what keeps one made up by a
	// client from reading the log past the window.
	if oldest := s.now().Add(-s.cfg.RequestLogWindow); q.Get("since") != "" && q.Get("cursor") == "" && since.Before(oldest) {
		return invalid("invalid_time", "since: the request log goes back %s (aggregator.request_log_window), to %s",
			s.cfg.RequestLogWindow, oldest.UTC().Format(time.RFC3339))
	} else if q.Get("cursor") != "" && since.Before(oldest.Add(-cursorLife)) {
		return invalid("invalid_cursor", "cursor: it reaches back past the request log's window; repeat the query without it")
	}
	rq := RequestsQuery{Account: k.AccountID, Environment: string(k.Environment), KeyID: k.ID, Since: since, Limit: limit + 1, Now: s.now()}
	if q.Get("cursor") != "" {
		// The page's top is checked as its bottom is: a made-up time past
		// 2105 wrapped round in ClickHouse and read the key's whole
		// history, or failed the query with a 500.
		at := time.UnixMicro(int64(cur.Micros))
		if rq.BeforeID, err = uuid.Parse(cur.ID); err != nil || cur.Micros == 0 || cur.Micros > math.MaxInt64 || !inDateTime(at) || at.Before(since) {
			return invalid("invalid_cursor", "cursor: not a cursor this query returned; repeat the query without it")
		}
		rq.BeforeMicros, rq.BeforeType = cur.Micros, cur.Type
	}
	rows, err := s.d.Usage.Requests(ctx, rq)
	if err != nil {
		return err
	}
	resp := requestsResponse{Object: "list", KeyID: k.ID, Data: rows}
	if resp.Data == nil {
		resp.Data = []RequestRow{}
	}
	if len(rows) > limit {
		resp.Data = rows[:limit]
		last := rows[limit-1]
		resp.HasMore = true
		resp.NextCursor = encodeCursorValue(cursor{Micros: last.TimeMicros, ID: last.EventID.String(), Type: last.Type, From: since.UnixMicro(), FP: fp})
	}
	return c.JSON(http.StatusOK, resp)
}

type meterView struct {
	Key         string   `json:"key"`
	EventType   string   `json:"event_type"`
	Aggregation string   `json:"aggregation"`
	GroupBy     []string `json:"group_by"`
}

// listMetersPublic tells a dashboard which meters it may query.
func (s *Server) listMetersPublic(c echo.Context) error {
	ms, err := s.d.Catalog.Meters(c.Request().Context())
	if err != nil {
		return err
	}
	out := make([]meterView, len(ms))
	for i, m := range ms {
		out[i] = meterView{Key: m.Key, EventType: m.EventType, Aggregation: string(m.Aggregation), GroupBy: m.GroupBy}
		if out[i].GroupBy == nil {
			out[i].GroupBy = []string{}
		}
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "data": out})
}

func (s *Server) listMeters(c echo.Context) error {
	ms, err := s.d.Catalog.Meters(c.Request().Context())
	if err != nil {
		return err
	}
	body := map[string]any{"object": "list", "data": ms}
	// Stored meters this version refuses are not in force; the operator
	// sees them here, with the rule each one breaks.
	refused, err := s.d.Catalog.Refused(c.Request().Context())
	if err != nil {
		return err
	}
	if len(refused) > 0 {
		body["refused"] = refused
	}
	return c.JSON(http.StatusOK, body)
}

func (s *Server) createMeter(c echo.Context) error {
	var m meter.Meter
	dec := json.NewDecoder(http.MaxBytesReader(c.Response(), c.Request().Body, 64<<10))
	dec.DisallowUnknownFields()
	err := dec.Decode(&m)
	if err == nil {
		// Nothing may follow the meter but space (More would let a "}" or
		// "]" pass, and drop the size limit's error).
		switch extra := dec.Decode(&json.RawMessage{}); {
		case extra == nil:
			err = errors.New("more than one JSON value")
		case !errors.Is(extra, io.EOF):
			err = extra
		}
	}
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return edge.NewAPIError(http.StatusRequestEntityTooLarge, edge.TypeInvalidRequest, "payload_too_large", "The body is larger than 64 KiB.")
	case err != nil:
		return invalid("invalid_json", "body: %v", err)
	}
	created, err := s.d.Catalog.Create(c.Request().Context(), m)
	if err != nil {
		return err
	}
	if !created {
		return c.JSON(http.StatusOK, m)
	}
	if s.d.Backfill != nil {
		s.d.Backfill(m)
	}
	return c.JSON(http.StatusCreated, m)
}

// handleError writes every error in the edge's one shape.
func (s *Server) handleError(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	ae := toAPIError(err)
	ae.RequestID = c.Response().Header().Get(edge.HeaderRequestID)
	if ae.Status == http.StatusUnauthorized {
		c.Response().Header().Set("WWW-Authenticate", edge.WWWAuthenticate) // as the edge answers
	}
	ae.SetHeaders(c.Response().Header().Get, c.Response().Header().Set)
	if ae.Status >= 500 {
		s.d.Log.Error("request failed", "request_id", ae.RequestID, "err", err)
	}
	if werr := c.JSON(ae.Status, map[string]*edge.APIError{"error": ae}); werr != nil {
		s.d.Log.Warn("write error response", "err", werr)
	}
}

// toAPIError maps the aggregator's domain errors to the one error shape and
// leaves key and HTTP errors to the edge's mapping, so they read the same on
// every Tollgate API.
func toAPIError(err error) *edge.APIError {
	switch {
	case errors.Is(err, ErrNotFound):
		return edge.NewAPIError(http.StatusNotFound, edge.TypeInvalidRequest, "meter_not_found", messageOf(err))
	case errors.Is(err, ErrInvalid):
		return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "invalid_meter", messageOf(err))
	case errors.Is(err, ErrConflict):
		return edge.NewAPIError(http.StatusConflict, edge.TypeInvalidRequest, "meter_exists", messageOf(err))
	default:
		return edge.ToAPIError(err)
	}
}

// messageOf drops the sentinel's own text from a joined error.
func messageOf(err error) string {
	var parts []string
	for _, line := range strings.Split(err.Error(), "\n") {
		switch line {
		case ErrConflict.Error(), ErrInvalid.Error(), ErrNotFound.Error():
			continue
		}
		parts = append(parts, line)
	}
	return strings.Join(parts, "; ")
}
