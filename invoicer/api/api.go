// Package api serves the invoice API for dashboards (current usage, the
// projected invoice, past invoices with lines and their Stripe links) and
// receives Stripe webhooks. Every request but the webhook is authenticated
// with one of the account's secret API keys and sees only that account.
package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// KeyStore finds an API key by the SHA-256 of its secret.
type KeyStore interface {
	KeyByHash(ctx context.Context, hash [32]byte) (edge.Key, error)
}

// Projector computes invoices for a period (the Invoicer does).
type Projector interface {
	ComputePeriod(ctx context.Context, usage invoicer.UsageReader, p invoicer.Period, accounts []invoicer.Account, wm time.Time) ([]invoicer.Invoice, error)
}

// Server is the invoice API.
type Server struct {
	keys     KeyStore
	store    invoicer.Store
	usage    invoicer.UsageReader
	proj     Projector
	verifier invoicer.WebhookVerifier // nil: webhooks refused
	meters   []meter.Meter
	log      *slog.Logger
	now      func() time.Time
	echo     *echo.Echo
	auditor  edge.Auditor // nil: failed authentications are not recorded
	// trusted are the proxies whose X-Forwarded-For is believed.
	trusted edge.TrustedProxies
	// ready reports whether the API's dependencies answer (/readyz).
	ready func(context.Context) error
}

// SetAuditor records the API's failed authentications to a, as the edge
// records its own. Call it before serving.
func (s *Server) SetAuditor(a edge.Auditor) { s.auditor = a }

// SetReady makes /readyz answer 503 while ready fails (nil: always
// ready). Call it before serving.
func (s *Server) SetReady(ready func(context.Context) error) { s.ready = ready }

// SetTrustedProxies makes the API believe the X-Forwarded-For of calls
// from t (invoicer.trusted_proxies) for the audit log's remote address.
func (s *Server) SetTrustedProxies(t edge.TrustedProxies) { s.trusted = t }

// readyz answers 200 when the API's dependencies answer, else 503; the
// cause goes to the log, not to the caller.
func (s *Server) readyz(c echo.Context) error {
	if s.ready != nil {
		if err := s.ready(c.Request().Context()); err != nil {
			s.log.Warn("not ready", "err", err)
			return edge.NewAPIError(http.StatusServiceUnavailable, edge.TypeAPI, "not_ready",
				"a dependency of the invoice API is unavailable; see its log")
		}
	}
	return c.String(http.StatusOK, "ready\n")
}

// New builds the API handler.
func New(keys KeyStore, store invoicer.Store, usage invoicer.UsageReader, proj Projector,
	verifier invoicer.WebhookVerifier, meters []meter.Meter, log *slog.Logger) *Server {
	if len(meters) == 0 {
		meters = []meter.Meter{meter.Default()}
	}
	s := &Server{keys: keys, store: store, usage: usage, proj: proj, verifier: verifier, meters: meters, log: log, now: time.Now}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.errorHandler
	e.Use(requestID)
	e.GET("/healthz", func(c echo.Context) error { return c.String(http.StatusOK, "ok\n") })
	e.GET("/readyz", s.readyz)
	e.POST("/v1/webhooks/stripe", s.webhook)
	g := e.Group("/v1", noStore, s.authenticate)
	g.GET("/usage/current", s.currentUsage, requireScope(UsageScope))
	g.GET("/invoices/upcoming", s.upcoming, requireScope(InvoicesScope))
	g.GET("/invoices", s.list, requireScope(InvoicesScope))
	g.GET("/invoices/:id", s.get, requireScope(InvoicesScope))
	edge.RefuseUnknownMethods(e)
	edge.RefuseOtherMethods(e, map[string]string{"/healthz": http.MethodGet, "/readyz": http.MethodGet, "/v1/webhooks/stripe": http.MethodPost})
	edge.RefuseOtherMethods(g, map[string]string{"/usage/current": http.MethodGet, "/invoices/upcoming": http.MethodGet,
		"/invoices": http.MethodGet, "/invoices/:id": http.MethodGet})
	s.echo = e
	return s
}

// noStore keeps an account's usage and invoices (and the refusals of a
// call for them) out of the caches between the API and its caller, the
// browser's on-disk one above all, as the usage API does.
func noStore(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Response().Header().Set("Cache-Control", "no-store")
		return next(c)
	}
}

// ServeHTTP makes the Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.echo.ServeHTTP(w, r) }

const headerRequestID = edge.HeaderRequestID

func requestID(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Response().Header().Set(headerRequestID, "req_"+strings.ReplaceAll(uuid.NewString(), "-", ""))
		return next(c)
	}
}

// authenticate accepts only a usable live secret key and pins the request
// to its account.
func (s *Server) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		r := c.Request()
		k, err := edge.AuthenticateKey(r.Context(), s.keys, edge.Bearer(r), s.now(), s.auditor, "invoice_api", s.trusted.RequestClientAddr(r))
		if err != nil {
			return err
		}
		if k.Kind != edge.Secret {
			return edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "secret_key_required",
				"Invoices and usage can be read only with a secret key (sk_…), never a publishable one.")
		}
		// Billing is live usage's: a test key, which tests code against
		// the sandbox, does not read the account's live money.
		if k.Environment != schemas.Live {
			return edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "live_key_required",
				"Invoices and billed usage are read with a live secret key (sk_live_…); test-mode usage is metered, never billed.")
		}
		c.Set("account", k.AccountID)
		c.Set("key", k)
		return next(c)
	}
}

// The scopes the invoice API's reads take. A key created without scopes
// has both (a secret key has every scope); a key restricted to others, say
// events:write for a batch job, reads no billing.
const (
	InvoicesScope = "invoices:read"
	UsageScope    = "usage:read" // as the usage API's
)

// requireScope refuses a key that lacks scope, as the usage API does.
func requireScope(scope string) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			k := c.Get("key").(edge.Key)
			if !edge.HasScope(k.Kind, k.Scopes, scope) {
				ae := edge.NewAPIError(http.StatusForbidden, edge.TypePermission, "insufficient_scope",
					fmt.Sprintf("This key lacks the %q scope this read takes.", scope))
				ae.Scope = scope
				return ae
			}
			return next(c)
		}
	}
}

func account(c echo.Context) string { return c.Get("account").(string) }

// UsageSummary is one environment's usage.
type UsageSummary struct {
	Events     int64            `json:"events"`
	Quantities map[string]int64 `json:"quantities"`
	// Overflow names the SUM meters whose quantity is past int64: theirs
	// is then int64's largest (or smallest) value, not the total.
	Overflow []string `json:"overflow,omitempty"`
}

// CurrentUsage is the response of GET /v1/usage/current.
type CurrentUsage struct {
	AccountID string          `json:"account_id"`
	Period    invoicer.Period `json:"period"`
	AsOf      time.Time       `json:"as_of"`
	// Live is billed; Test is metered, never billed.
	Live UsageSummary `json:"live"`
	Test UsageSummary `json:"test"`
}

func (s *Server) period(ctx context.Context, acct string) (invoicer.Account, invoicer.Period, time.Time, error) {
	a, err := s.store.Account(ctx, acct)
	if err != nil {
		return a, invoicer.Period{}, time.Time{}, err
	}
	loc, err := caltime.LoadZone(a.Timezone)
	if err != nil {
		loc = time.UTC
	}
	now := s.now().UTC().Truncate(time.Second)
	invs, err := s.store.AccountInvoices(ctx, acct)
	if err != nil {
		return a, invoicer.Period{}, time.Time{}, err
	}
	invoiced := make([]invoicer.Period, len(invs))
	for i, inv := range invs {
		invoiced[i] = inv.Period
	}
	return a, invoicer.OpenPeriod(now, loc, invoiced, a.CreatedAt), now, nil
}

func (s *Server) currentUsage(c echo.Context) error {
	ctx := c.Request().Context()
	a, p, now, err := s.period(ctx, account(c))
	if err != nil {
		return err
	}
	out := CurrentUsage{AccountID: a.ID, Period: p, AsOf: now}
	for _, x := range []struct {
		env schemas.Environment
		dst *UsageSummary
	}{{schemas.Live, &out.Live}, {schemas.Test, &out.Test}} {
		u, err := s.usage.Usage(ctx, []string{a.ID}, invoicer.Period{Start: p.Start, End: now.Add(time.Second)}, s.meters, x.env)
		if err != nil {
			return err
		}
		q := u[a.ID].Quantities
		if q == nil {
			q = map[string]int64{}
		}
		var over []string
		for _, m := range s.meters {
			if _, ok := q[m.Key]; !ok {
				q[m.Key] = 0
			}
			if m.Aggregation == meter.Sum && meter.Overflowed(q[m.Key]) {
				over = append(over, m.Key)
			}
		}
		*x.dst = UsageSummary{Events: u[a.ID].Events, Quantities: q, Overflow: over}
	}
	return c.JSON(http.StatusOK, out)
}

// Upcoming is the projected invoice: this period's live usage so far,
// priced under the plans in force, flat fees in full.
type Upcoming struct {
	invoicer.Invoice
	AsOf time.Time `json:"as_of"`
}

func (s *Server) upcoming(c echo.Context) error {
	ctx := c.Request().Context()
	a, p, now, err := s.period(ctx, account(c))
	if err != nil {
		return err
	}
	invs, err := s.proj.ComputePeriod(ctx, asOf{s.usage, now.Add(time.Second)}, p, []invoicer.Account{a}, now)
	if errors.Is(err, invoicer.ErrInvalid) || errors.Is(err, invoicer.ErrNotFound) || errors.Is(err, invoicer.ErrOverflow) {
		// The call asks nothing a caller could get wrong: the account's
		// plans cannot be priced (a version refused as written or missing,
		// a currency or meter the operator must mend, an amount past what
		// the ledger holds). The operator's to know, not the caller's to
		// read: a 404 would tell the caller its own resource is missing.
		s.log.Error("the upcoming invoice cannot be priced", "account_id", a.ID, "err", err)
		return edge.NewAPIError(http.StatusServiceUnavailable, edge.TypeAPI, "billing_unavailable",
			"The upcoming invoice cannot be computed now; the operator has been told.")
	}
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, Upcoming{Invoice: invs[0], AsOf: now})
}

// asOf cuts every usage read at a time, so a projection counts only what
// has happened.
type asOf struct {
	invoicer.UsageReader
	t time.Time
}

func (u asOf) Usage(ctx context.Context, accounts []string, p invoicer.Period, meters []meter.Meter, env schemas.Environment) (map[string]invoicer.AccountUsage, error) {
	if p.End.After(u.t) {
		p.End = u.t
	}
	if !p.End.After(p.Start) {
		return map[string]invoicer.AccountUsage{}, nil
	}
	return u.UsageReader.Usage(ctx, accounts, p, meters, env)
}

// List is a page of invoices, newest period first, as Stripe pages its
// lists: ask for the next with starting_after set to the page's last id
// while has_more is true.
type List struct {
	Object  string                   `json:"object"`
	Data    []invoicer.StoredInvoice `json:"data"`
	HasMore bool                     `json:"has_more"`
	URL     string                   `json:"url"`
}

// Page sizes of GET /v1/invoices (?limit=), as Stripe's lists have them.
const (
	defaultListLimit = 10
	maxListLimit     = 100
)

func (s *Server) list(c echo.Context) error {
	ctx, acct := c.Request().Context(), account(c)
	limit := defaultListLimit
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxListLimit {
			return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "invalid_limit",
				fmt.Sprintf("limit must be a whole number from 1 to %d, got %s.", maxListLimit, strconv.QuoteToASCII(v)))
		}
		limit = n
	}
	var before time.Time
	if after := c.QueryParam("starting_after"); after != "" {
		// The cursor is an invoice of the caller's own: another account's
		// is refused as an unknown one is, so ids cannot be probed.
		var inv invoicer.StoredInvoice
		err := invoicer.ErrNotFound
		if invoiceIDShape(after) { // Postgres refuses some strings outright
			inv, err = s.store.Invoice(ctx, after)
		}
		if errors.Is(err, invoicer.ErrNotFound) || err == nil && inv.AccountID != acct {
			return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "invalid_starting_after",
				"starting_after must be the id of one of your invoices, the last of the page before.")
		}
		if err != nil {
			return err
		}
		before = inv.Period.Start
	}
	invs, err := s.store.AccountInvoicesBefore(ctx, acct, before, limit+1)
	if err != nil {
		return err
	}
	more := len(invs) > limit
	if more {
		invs = invs[:limit]
	}
	if invs == nil {
		invs = []invoicer.StoredInvoice{}
	}
	return c.JSON(http.StatusOK, List{Object: "list", Data: invs, HasMore: more, URL: "/v1/invoices"})
}

func (s *Server) get(c echo.Context) error {
	id := c.Param("id")
	if !invoiceIDShape(id) {
		// Not an id the ledger could hold (Postgres refuses a NUL or bad
		// UTF-8 outright): missing, as any other unknown id.
		return invoicer.ErrNotFound
	}
	inv, err := s.store.Invoice(c.Request().Context(), id)
	if err != nil {
		return err
	}
	// Another account's invoice is indistinguishable from a missing one.
	if inv.AccountID != account(c) {
		return invoicer.ErrNotFound
	}
	return c.JSON(http.StatusOK, inv)
}

// invoiceIDShape reports whether id could be an invoice id: 1 to 128
// visible ASCII characters.
func invoiceIDShape(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] <= ' ' || id[i] > '~' {
			return false
		}
	}
	return true
}

// maxWebhook bounds a webhook body; Stripe's are far smaller.
const maxWebhook = 1 << 20

func (s *Server) webhook(c echo.Context) error {
	if s.verifier == nil {
		return edge.NewAPIError(http.StatusNotFound, edge.TypeInvalidRequest, "webhooks_disabled",
			"Stripe webhooks are not configured (invoicer.stripe.webhook_secret).")
	}
	body, err := io.ReadAll(io.LimitReader(c.Request().Body, maxWebhook+1))
	if err != nil {
		return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "unreadable_body", "The request body could not be read.")
	}
	if len(body) > maxWebhook {
		return edge.NewAPIError(http.StatusRequestEntityTooLarge, edge.TypeInvalidRequest, "payload_too_large", "Webhook body larger than 1 MiB.")
	}
	ev, err := s.verifier.Verify(body, c.Request().Header.Get("Stripe-Signature"))
	if err != nil {
		return err
	}
	fresh, err := s.store.RecordWebhook(c.Request().Context(), ev)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"received": true, "duplicate": !fresh})
}

// toAPIError maps the invoicer's domain errors to the one error shape and
// leaves key and HTTP errors to the edge's mapping, so they read the same on
// every Tollgate API.
func toAPIError(err error) *edge.APIError {
	switch {
	case errors.Is(err, invoicer.ErrUnauthorized):
		return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "invalid_signature",
			"The Stripe-Signature header does not match the payload.")
	case errors.Is(err, invoicer.ErrNotFound):
		return edge.NewAPIError(http.StatusNotFound, edge.TypeInvalidRequest, "resource_missing", "No such resource.")
	case errors.Is(err, invoicer.ErrInvalid):
		return edge.NewAPIError(http.StatusBadRequest, edge.TypeInvalidRequest, "invalid_request", err.Error())
	default:
		return edge.ToAPIError(err)
	}
}

func (s *Server) errorHandler(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	ae := *toAPIError(err)
	ae.RequestID = c.Response().Header().Get(headerRequestID)
	ae.SetHeaders(c.Response().Header().Get, c.Response().Header().Set)
	if ae.Status == http.StatusUnauthorized {
		c.Response().Header().Set("WWW-Authenticate", edge.WWWAuthenticate) // as the edge and the usage API answer
	}
	if ae.Status >= 500 {
		s.log.Error("invoice api request failed", "request_id", ae.RequestID, "err", err)
	}
	if werr := c.JSON(ae.Status, map[string]*edge.APIError{"error": &ae}); werr != nil {
		s.log.Warn("write error response", "err", werr)
	}
}
