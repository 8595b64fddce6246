package edge

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/schemas"
)

// DefaultRollOverlap is how long a rolled key keeps working by default.
const DefaultRollOverlap = 24 * time.Hour

// MinRollOverlap is the shortest overlap a roll takes other than 0s.
const MinRollOverlap = time.Second

// AdminDeps are the admin API's collaborators.
type AdminDeps struct {
	Store   AdminStore
	Auditor Auditor
	// Gatherer serves /metrics; nil serves none.
	Gatherer prometheus.Gatherer
	Log      *slog.Logger
	Ready    func(ctx echo.Context) error
	// Scopes are the scopes something asks for: the routes' and Tollgate's
	// own APIs' (KnownScopes). A key created with a scope that grants none
	// of them is made, with a warning in the answer: a misspelt scope made
	// a key refused everywhere, without a word. Nil warns of nothing.
	Scopes []string
}

// KnownScopes are the scopes routes ask for, with those Tollgate's own
// APIs ask for: events:write (POST /v1/events), usage:read (the usage API,
// the current usage) and invoices:read (the invoice API).
func KnownScopes(routes []RouteConfig) []string {
	out := []string{eventsScope, "usage:read", "invoices:read"}
	for _, r := range routes {
		out = append(out, r.Scopes...)
	}
	return out
}

// Admin is the key-lifecycle API. It listens on its own address and takes
// its own credential: a bearer token whose SHA-256 is configured, compared
// in constant time.
type Admin struct {
	deps      AdminDeps
	tokenHash []byte
	now       func() time.Time
	echo      *echo.Echo
}

// NewAdmin builds the admin handler; tokenSHA256 is hex.
func NewAdmin(tokenSHA256 string, deps AdminDeps) (*Admin, error) {
	h, err := hex.DecodeString(tokenSHA256)
	if err != nil || len(h) != sha256.Size {
		return nil, errors.New("admin token hash: want 64 hex characters")
	}
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	a := &Admin{deps: deps, tokenHash: h, now: time.Now}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = errorHandler(deps.Log)
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			c.Response().Header().Set(HeaderRequestID, RequestIDFor(schemas.NewEventID()))
			return next(c)
		}
	})
	e.GET("/healthz", func(c echo.Context) error { return c.String(http.StatusOK, "ok\n") })
	e.GET("/readyz", func(c echo.Context) error {
		if deps.Ready != nil {
			if err := deps.Ready(c); err != nil {
				return NewAPIError(http.StatusServiceUnavailable, TypeAPI, "not_ready", err.Error())
			}
		}
		return c.String(http.StatusOK, "ready\n")
	})
	if deps.Gatherer != nil {
		e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(deps.Gatherer, promhttp.HandlerOpts{})))
	}
	g := e.Group("/admin/v1", a.auth)
	g.PUT("/accounts/:account", a.putAccount)
	g.POST("/accounts/:account/keys", a.createKey)
	g.GET("/accounts/:account/keys", a.listKeys)
	g.GET("/keys/:id", a.getKey)
	g.POST("/keys/:id/roll", a.rollKey)
	g.POST("/keys/:id/revoke", a.revokeKey)
	RefuseUnknownMethods(e)
	RefuseOtherMethods(e, map[string]string{"/healthz": http.MethodGet, "/readyz": http.MethodGet})
	RefuseOtherMethods(g, map[string]string{"/accounts/:account": http.MethodPut, "/accounts/:account/keys": http.MethodGet + ", " + http.MethodPost,
		"/keys/:id": http.MethodGet, "/keys/:id/roll": http.MethodPost, "/keys/:id/revoke": http.MethodPost})
	a.echo = e
	return a, nil
}

// ServeHTTP makes Admin an http.Handler.
func (a *Admin) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.echo.ServeHTTP(w, r) }

func (a *Admin) auth(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		tok := keyFromAuthorization(c.Request().Header.Get("Authorization"))
		sum := sha256.Sum256([]byte(tok))
		if tok == "" || subtle.ConstantTimeCompare(sum[:], a.tokenHash) != 1 {
			if a.deps.Auditor != nil {
				reason := "wrong admin token"
				if tok == "" {
					reason = "no admin token"
				}
				a.deps.Auditor.Record(AuditEvent{At: a.now(), Actor: "admin", Action: ActionAdminAuth,
					RemoteAddr: hostOnly(c.Request().RemoteAddr), Reason: reason, Count: 1})
			}
			return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "invalid_admin_token",
				"The admin API needs 'Authorization: Bearer <admin token>'.")
		}
		return next(c)
	}
}

func (a *Admin) info(c echo.Context, reason string) AuditInfo {
	return AuditInfo{Actor: "admin", RemoteAddr: hostOnly(c.Request().RemoteAddr), Reason: reason}
}

// KeyView is a key as the admin API shows it: never the secret or its hash.
type KeyView struct {
	ID            string     `json:"id"`
	AccountID     string     `json:"account_id"`
	Environment   string     `json:"environment"`
	Kind          string     `json:"kind"`
	Name          string     `json:"name"`
	DisplayPrefix string     `json:"display_prefix"`
	Scopes        []string   `json:"scopes"`
	CreatedAt     *time.Time `json:"created_at,omitempty"`
	ExpiresAt     *time.Time `json:"expires_at"`
	RevokedAt     *time.Time `json:"revoked_at"`
	RolledFrom    string     `json:"rolled_from,omitempty"`
	Status        string     `json:"status"`
}

// maxExpiryYears bounds how far ahead a key's expires_at may be.
const maxExpiryYears = 100

func (a *Admin) view(k Key) KeyView {
	v := KeyView{
		ID: k.ID, AccountID: k.AccountID, Environment: string(k.Environment), Kind: string(k.Kind),
		Name: k.Name, DisplayPrefix: k.DisplayPrefix, Scopes: k.Scopes, ExpiresAt: k.ExpiresAt,
		RevokedAt: k.RevokedAt, RolledFrom: k.RolledFrom, Status: "active",
	}
	if len(v.Scopes) == 0 {
		// A key created without scopes, shown as what it grants (as the
		// upstream sees it in Tollgate-Scopes): an empty list read as "no
		// access" when it is every access on a secret key.
		v.Scopes = []string{"*"}
		if k.Kind == Publishable {
			v.Scopes = []string{publishableScope}
		}
	}
	if !k.CreatedAt.IsZero() {
		t := k.CreatedAt
		v.CreatedAt = &t
	}
	switch err := k.Usable(a.now()); {
	case errors.Is(err, ErrKeyRevoked):
		v.Status = "revoked"
	case errors.Is(err, ErrKeyExpired):
		v.Status = "expired"
	}
	return v
}

// CreatedKey is the answer to create and roll: the only time the secret is
// ever shown.
type CreatedKey struct {
	Key KeyView `json:"key"`
	// Secret is shown once, in the answer to the request that made the
	// key: never in the answer to a retry of it (Replayed).
	Secret   string `json:"secret,omitempty"`
	Replayed bool   `json:"replayed,omitempty"`
	// Previous is the rolled key with its new expiry (roll only).
	Previous *KeyView `json:"previous,omitempty"`
	// Warnings name the key's scopes that grant nothing anything asks for
	// (AdminDeps.Scopes).
	Warnings []string `json:"warnings,omitempty"`
}

func (a *Admin) putAccount(c echo.Context) error {
	var in struct {
		Name     *string `json:"name"`
		TimeZone *string `json:"timezone"`
	}
	if err := bind(c, &in); err != nil {
		return err
	}
	id, err := accountParam(c)
	if err != nil {
		return err
	}
	if in.Name != nil {
		if err := validText("name", *in.Name, maxNameBytes); err != nil {
			return err
		}
		if *in.Name == "" {
			in.Name = nil
		}
	}
	if in.TimeZone != nil {
		// An IANA name Go loads; "" or "Local" would mean this machine's.
		if _, err := caltime.LoadZone(*in.TimeZone); err != nil || *in.TimeZone == "" || *in.TimeZone == "Local" {
			return fmt.Errorf("%w: timezone %s: want an IANA zone name such as \"Europe/Berlin\" or \"UTC\"", ErrInvalid, strconv.QuoteToASCII(*in.TimeZone))
		}
	}
	acct, err := a.deps.Store.PutAccount(c.Request().Context(), id, in.Name, in.TimeZone)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, acct)
}

type keyRequest struct {
	Kind        string     `json:"kind"`
	Environment string     `json:"environment"`
	Name        string     `json:"name"`
	Scopes      []string   `json:"scopes"`
	ExpiresAt   *time.Time `json:"expires_at"`
}

// maxAdminBody bounds an admin request's body.
const maxAdminBody = 1 << 20

// Bounds of the free-text fields: an account's or key's name, a revoke's
// reason (which the audit log keeps).
const (
	maxNameBytes   = 200
	maxReasonBytes = 500
)

// bind decodes the request's JSON body into v; an empty body leaves v as
// it is. The body is read as JSON whatever else it claims to be, and
// strictly: a body of another media type (curl -d sends a form's) gets 415
// and an unknown or misspelt field 400, where binding them leniently read
// nothing and made a secret key with every scope out of a request for a
// publishable one.
func bind(c echo.Context, v any) error {
	r := c.Request()
	if ct := r.Header.Get(echo.HeaderContentType); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != echo.MIMEApplicationJSON {
			return NewAPIError(http.StatusUnsupportedMediaType, TypeInvalidRequest, "unsupported_media_type",
				fmt.Sprintf("The body is %q; send JSON with Content-Type: application/json.", ct))
		}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxAdminBody+1))
	if err != nil {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_body", "Could not read the request body.")
	}
	if len(body) > maxAdminBody {
		return NewAPIError(http.StatusRequestEntityTooLarge, TypeInvalidRequest, "payload_too_large", "The body is larger than 1 MiB.")
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_json", "The body is not valid JSON for this call: "+err.Error()+".")
	}
	// Nothing may follow but space: More would let a "}" or "]" pass.
	if err := dec.Decode(&json.RawMessage{}); !errors.Is(err, io.EOF) {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_json", "The body has more than one JSON value.")
	}
	return nil
}

// visibleASCII reports whether s is 1 to max bytes of visible ASCII (no
// space, no control character): safe in a header value and a URL path.
func visibleASCII(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// validText checks a free-text field an operator sends (a name, a reason):
// valid UTF-8 of at most max bytes without control characters. Postgres
// refuses a NUL or invalid UTF-8 in text, and a revoke whose reason it
// refused rolled back: the key stayed active behind a 500.
func validText(field, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%w: %s is longer than %d bytes", ErrInvalid, field, max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, field)
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("%w: %s has a control character (%U)", ErrInvalid, field, r)
		}
	}
	return nil
}

// accountParam is the path's account id, refused unless it is one.
func accountParam(c echo.Context) (string, error) {
	id := c.Param("account")
	if !schemas.ValidIdent(id) {
		return "", fmt.Errorf("%w: an account id is 1 to %d letters, digits and _ . : - (it is in every event, and sent to the upstream in %s)",
			ErrInvalid, schemas.MaxIDLength, HeaderAccount)
	}
	return id, nil
}

// keyParam is the path's key id. One no key could have (every id is
// key_ and hex) is not found, without asking the store.
func keyParam(c echo.Context) (string, error) {
	id := c.Param("id")
	if !visibleASCII(id, 64) {
		return "", fmt.Errorf("%w: no key %s", ErrNotFound, strconv.QuoteToASCII(id))
	}
	return id, nil
}

// validScopes checks scopes and refuses write scopes on publishable keys.
// An empty list given as such is refused: a key without scopes has every
// scope its kind allows, the opposite of what "scopes": [] asks for.
func validScopes(kind KeyKind, scopes []string) error {
	if scopes != nil && len(scopes) == 0 {
		return fmt.Errorf("%w: scopes is empty; a key with no scopes would be one that can do nothing, and a key created without scopes has every scope its kind allows (leave scopes out for that)", ErrInvalid)
	}
	for _, s := range scopes {
		if !visibleASCII(s, 64) || strings.Contains(s, ",") {
			return fmt.Errorf("%w: bad scope %q", ErrInvalid, s)
		}
		if kind == Publishable && !strings.HasSuffix(s, ":read") {
			return fmt.Errorf("%w: publishable keys take only read scopes (\"x:read\"), not %q", ErrInvalid, s)
		}
	}
	return nil
}

func newKeyID() string {
	return "key_" + strings.ReplaceAll(schemas.NewEventID().String(), "-", "")
}

func (a *Admin) createKey(c echo.Context) error {
	var in keyRequest
	if err := bind(c, &in); err != nil {
		return err
	}
	kind := KeyKind(in.Kind)
	if in.Kind == "" {
		kind = Secret
	}
	env := schemas.Environment(in.Environment)
	if in.Environment == "" {
		env = schemas.Live
	}
	if kind != Secret && kind != Publishable {
		return fmt.Errorf("%w: kind must be secret or publishable", ErrInvalid)
	}
	if !env.Valid() {
		return fmt.Errorf("%w: environment must be live or test", ErrInvalid)
	}
	if err := validScopes(kind, in.Scopes); err != nil {
		return err
	}
	account, err := accountParam(c)
	if err != nil {
		return err
	}
	if err := validText("name", in.Name, maxNameBytes); err != nil {
		return err
	}
	if in.ExpiresAt != nil && in.ExpiresAt.After(a.now().AddDate(maxExpiryYears, 0, 0)) {
		// Past year 9999 in UTC the key was stored but could not be
		// shown: its create, its account's key list and its revoke all
		// answered 500. A key that should never expire has none.
		return fmt.Errorf("%w: expires_at is more than %d years ahead; leave it out for a key that does not expire", ErrInvalid, maxExpiryYears)
	}
	if in.ExpiresAt != nil {
		t := in.ExpiresAt.UTC()
		in.ExpiresAt = &t
	}
	idem := c.Request().Header.Get(HeaderIdempotencyKey)
	if err := validIdempotencyKey(idem); err != nil {
		return err
	}
	ctx := c.Request().Context()
	var reqHash []byte
	if idem != "" {
		// A retry is answered before the checks against the clock: one
		// that comes after the key's expiry asks for what was made then.
		reqHash = createHash(kind, env, in)
		prior, err := a.deps.Store.IdempotentKey(ctx, account, idem)
		if err != nil {
			return err
		}
		if prior != nil {
			return a.replayCreate(c, prior, reqHash, in.Scopes)
		}
	}
	if in.ExpiresAt != nil && !in.ExpiresAt.After(a.now()) {
		return fmt.Errorf("%w: expires_at is in the past", ErrInvalid)
	}
	secret, parsed, err := GenerateKey(kind, env)
	if err != nil {
		return err
	}
	nk := NewKey{ID: newKeyID(), AccountID: account, Name: in.Name, Parsed: parsed,
		Scopes: in.Scopes, ExpiresAt: in.ExpiresAt, Audit: a.info(c, "created through the admin API"),
		IdempotencyKey: idem, RequestHash: reqHash}
	var prior *IdempotentReplay
	switch err := a.deps.Store.CreateKey(ctx, nk); {
	case errors.As(err, &prior):
		// Another create with this Idempotency-Key made its key first.
		return a.replayCreate(c, prior, reqHash, in.Scopes)
	case err != nil:
		return err
	}
	k, err := a.deps.Store.GetKey(ctx, nk.ID)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, CreatedKey{Key: a.view(k), Secret: secret, Warnings: a.idleScopes(in.Scopes)})
}

// replayCreate answers a create whose Idempotency-Key made prior's key:
// with that key (never its secret, which only the first answer showed) when
// the request is the same and the key still works; refused otherwise.
func (a *Admin) replayCreate(c echo.Context, prior *IdempotentReplay, reqHash []byte, scopes []string) error {
	if !bytes.Equal(prior.RequestHash, reqHash) {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "idempotency_key_reused", fmt.Sprintf(
			"This Idempotency-Key made key %s with other parameters; use a new Idempotency-Key for another key.", prior.KeyID))
	}
	k, err := a.deps.Store.GetKey(c.Request().Context(), prior.KeyID)
	if err != nil {
		return err
	}
	if err := k.Usable(a.now()); err != nil {
		// A dead key is no answer to "make me a key": the client is told
		// so, rather than handed a key that refuses every call.
		return NewAPIError(http.StatusConflict, TypeInvalidRequest, "idempotency_key_used", fmt.Sprintf(
			"This Idempotency-Key made key %s, which can no longer be used (%v); use a new Idempotency-Key to create another key.", k.ID, err))
	}
	c.Response().Header().Set(HeaderIdempotentReplayed, "true")
	return c.JSON(http.StatusOK, CreatedKey{Key: a.view(k), Replayed: true, Warnings: append(a.idleScopes(scopes),
		"an earlier request with this Idempotency-Key made this key, and its secret was shown only in that answer; "+
			"if that answer was lost, roll the key with overlap 0s for a new secret (a key rolled already cannot be: "+
			"revoke it, and create another with a new Idempotency-Key)")})
}

// HeaderIdempotencyKey, on a key create, makes a retry of it safe: the
// account's second create with the same value makes no second key.
// HeaderIdempotentReplayed marks the answer to such a retry.
const (
	HeaderIdempotencyKey     = "Idempotency-Key"
	HeaderIdempotentReplayed = "Idempotent-Replayed"
)

// maxIdempotencyKey bounds an Idempotency-Key, as Stripe's.
const maxIdempotencyKey = 255

// validIdempotencyKey refuses an Idempotency-Key that is too long or not
// printable ASCII; an empty one is no key.
func validIdempotencyKey(k string) error {
	if len(k) > maxIdempotencyKey {
		return fmt.Errorf("%w: %s is longer than %d bytes", ErrInvalid, HeaderIdempotencyKey, maxIdempotencyKey)
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return fmt.Errorf("%w: %s may hold only printable ASCII", ErrInvalid, HeaderIdempotencyKey)
		}
	}
	return nil
}

// createHash is what a key create asks for, as the admin API read it
// (defaults filled in, the scopes as a set, the expiry in UTC), in a
// canonical form of its own, hashed: a retry must ask for the same key to
// be answered with it, and the form does not change with the request's
// JSON. Each part is length-prefixed, so no two requests share a form;
// the leading version lets a later form tell old hashes apart.
func createHash(kind KeyKind, env schemas.Environment, in keyRequest) []byte {
	scopes := slices.Compact(slices.Sorted(slices.Values(in.Scopes)))
	expires := ""
	if in.ExpiresAt != nil {
		expires = in.ExpiresAt.UTC().Format(time.RFC3339Nano)
	}
	var b []byte
	put := func(s string) { b = append(strconv.AppendInt(b, int64(len(s)), 10), ':'); b = append(b, s...) }
	put("key-create-v1")
	put(string(kind))
	put(string(env))
	put(in.Name)
	put(strconv.Itoa(len(scopes)))
	for _, sc := range scopes {
		put(sc)
	}
	put(expires)
	sum := sha256.Sum256(b)
	return sum[:]
}

// idleScopes warns of each of scopes that grants none of the known ones.
func (a *Admin) idleScopes(scopes []string) []string {
	if a.deps.Scopes == nil {
		return nil
	}
	var out []string
	for _, s := range scopes {
		if !slices.ContainsFunc(a.deps.Scopes, func(k string) bool { return scopeMatch(s, k) }) {
			out = append(out, fmt.Sprintf("scope %q grants nothing: no route of this edge, nor Tollgate's own APIs, asks for it (misspelt?); the key was created with it", s))
		}
	}
	return out
}

func (a *Admin) listKeys(c echo.Context) error {
	account, err := accountParam(c)
	if err != nil {
		return err
	}
	keys, err := a.deps.Store.ListKeys(c.Request().Context(), account)
	if err != nil {
		return err
	}
	out := make([]KeyView, len(keys))
	for i, k := range keys {
		out[i] = a.view(k)
	}
	return c.JSON(http.StatusOK, map[string]any{"keys": out})
}

func (a *Admin) getKey(c echo.Context) error {
	id, err := keyParam(c)
	if err != nil {
		return err
	}
	k, err := a.deps.Store.GetKey(c.Request().Context(), id)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, a.view(k))
}

func (a *Admin) rollKey(c echo.Context) error {
	var in struct {
		// Overlap is how long the old key keeps working, e.g. "24h"; "0s"
		// ends it at once.
		Overlap *string `json:"overlap"`
	}
	if err := bind(c, &in); err != nil {
		return err
	}
	overlap := DefaultRollOverlap
	if in.Overlap != nil {
		d, err := time.ParseDuration(*in.Overlap)
		if err != nil || d < 0 || d > 90*24*time.Hour {
			return fmt.Errorf("%w: overlap must be a duration between 0s and 2160h", ErrInvalid)
		}
		// An overlap of a moment is an expiry now, which an edge whose
		// clock is behind keeps serving; 0s revokes at once instead.
		if d > 0 && d < MinRollOverlap {
			return fmt.Errorf("%w: overlap must be 0s (the old key ends at once) or at least %s", ErrInvalid, MinRollOverlap)
		}
		overlap = d
	}
	ctx := c.Request().Context()
	id, err := keyParam(c)
	if err != nil {
		return err
	}
	old, err := a.deps.Store.GetKey(ctx, id)
	if err != nil {
		return err
	}
	if err := old.Usable(a.now()); err != nil {
		return fmt.Errorf("%w: key %s cannot be rolled: %v", ErrConflict, old.ID, err)
	}
	secret, parsed, err := GenerateKey(old.Kind, old.Environment)
	if err != nil {
		return err
	}
	nk := NewKey{ID: newKeyID(), AccountID: old.AccountID, Name: old.Name, Parsed: parsed, Scopes: old.Scopes,
		ExpiresAt: old.ExpiresAt, RolledFrom: old.ID, Audit: a.info(c, "rolled with overlap "+overlap.String())}
	// An overlap of 0s ends the old key at once: revoked, since an expiry
	// is read against each edge's own clock.
	now := a.now()
	prev, err := a.deps.Store.RollKey(ctx, old.ID, nk, now, now.Add(overlap), overlap == 0)
	if err != nil {
		return err
	}
	k, err := a.deps.Store.GetKey(ctx, nk.ID)
	if err != nil {
		return err
	}
	pv := a.view(prev)
	return c.JSON(http.StatusCreated, CreatedKey{Key: a.view(k), Secret: secret, Previous: &pv})
}

func (a *Admin) revokeKey(c echo.Context) error {
	var in struct {
		Reason string `json:"reason"`
	}
	if err := bind(c, &in); err != nil {
		return err
	}
	if err := validText("reason", in.Reason, maxReasonBytes); err != nil {
		return err
	}
	id, err := keyParam(c)
	if err != nil {
		return err
	}
	reason := in.Reason
	if reason == "" {
		reason = "revoked through the admin API"
	}
	k, err := a.deps.Store.RevokeKey(c.Request().Context(), id, a.now(), a.info(c, reason))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, a.view(k))
}
