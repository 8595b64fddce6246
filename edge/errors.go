package edge

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"
)

// APIError is the one error shape every edge response uses.
type APIError struct {
	Status    int    `json:"-"`
	Type      string `json:"type"`
	Code      string `json:"code"`
	Message   string `json:"message"`
	RequestID string `json:"request_id,omitempty"`
	DocURL    string `json:"doc_url,omitempty"`
	// Set on rate-limit and quota errors: which limit was hit, when to
	// retry, and where to buy more.
	Limit      string `json:"limit,omitempty"`
	RetryAfter *int64 `json:"retry_after,omitempty"`
	RetryAt    string `json:"retry_at,omitempty"`
	UpgradeURL string `json:"upgrade_url,omitempty"`
	// Scope is the missing scope on insufficient_scope errors.
	Scope string `json:"scope,omitempty"`
	// Allow, on a 405, lists the methods the edge takes: the answer's
	// Allow header (RFC 9110, 15.5.6).
	Allow string `json:"-"`
}

// AllowedMethods are the methods the edge proxies, as a 405's Allow header
// names them.
const AllowedMethods = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

// SetHeaders sets the headers that go with e on an answer: Allow and
// Retry-After, unless set already (the rate limits set their own).
func (e *APIError) SetHeaders(get func(name string) string, set func(name, value string)) {
	if e.Allow != "" && get("Allow") == "" {
		set("Allow", e.Allow)
	}
	if e.RetryAfter != nil && get("Retry-After") == "" {
		set("Retry-After", strconv.FormatInt(*e.RetryAfter, 10))
	}
}

func (e *APIError) Error() string { return e.Code + ": " + e.Message }

// Error types, as Stripe groups them.
const (
	TypeInvalidRequest = "invalid_request_error"
	TypeAuthentication = "authentication_error"
	TypePermission     = "permission_error"
	TypeRateLimit      = "rate_limit_error"
	TypeAPI            = "api_error"
)

// DocBase is where error codes are documented.
const DocBase = "https://tollgate.dev/docs/errors#"

// NewAPIError builds an error with its documentation link.
func NewAPIError(status int, typ, code, msg string) *APIError {
	return &APIError{Status: status, Type: typ, Code: code, Message: msg, DocURL: DocBase + code}
}

// UpstreamBusy is the answer to a call that found every connection to the
// upstream busy (edge.upstream_max_conns) for as long as upstream_timeout:
// it never reached the upstream, so it may be retried as it is.
func UpstreamBusy() *APIError {
	return RetryShortly(NewAPIError(http.StatusServiceUnavailable, TypeAPI, "upstream_busy",
		"The upstream service has as many calls in flight as the edge sends it at once; retry shortly."))
}

// RetryShortly has ae, a refusal that passes, say to retry in a second:
// its Retry-After and retry_after, for clients that back off on them.
func RetryShortly(ae *APIError) *APIError {
	retry := int64(1)
	ae.RetryAfter = &retry
	return ae
}

// KeyEnded is the answer to a call held under its key (HoldsUpload) whose
// key stopped being usable before the upstream's answer began: revoked,
// expired, or not to be looked up again (fail closed). The caller's
// connection is closed after it, as the rest of the upload is not read.
func KeyEnded() *APIError {
	return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "api_key_ended",
		"The API key was revoked or expired while the call was under way.")
}

// toAPIError maps domain errors to HTTP. It is the only place that does.
func toAPIError(err error) *APIError {
	var ae *APIError
	var he *echo.HTTPError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, ErrNoKey):
		return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "missing_api_key",
			"No API key provided. Send it as 'Authorization: Bearer <key>'.")
	case errors.Is(err, ErrMalformedKey):
		return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "malformed_api_key",
			"The API key is not in a valid format.")
	case errors.Is(err, ErrKeyNotFound):
		return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "invalid_api_key",
			"The API key is not valid.")
	case errors.Is(err, ErrKeyRevoked):
		return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "revoked_api_key",
			"The API key has been revoked.")
	case errors.Is(err, ErrKeyExpired):
		return NewAPIError(http.StatusUnauthorized, TypeAuthentication, "expired_api_key",
			"The API key has expired.")
	case errors.Is(err, ErrNotFound):
		return NewAPIError(http.StatusNotFound, TypeInvalidRequest, "resource_missing", err.Error())
	case errors.Is(err, ErrInvalid):
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_request", err.Error())
	case errors.Is(err, ErrConflict):
		return NewAPIError(http.StatusConflict, TypeInvalidRequest, "conflict", err.Error())
	case errors.As(err, &he):
		msg := http.StatusText(he.Code)
		if m, ok := he.Message.(string); ok {
			msg = m
		}
		typ := TypeInvalidRequest
		if he.Code >= 500 {
			typ = TypeAPI
		}
		return NewAPIError(he.Code, typ, codeForStatus(he.Code), msg)
	default:
		return NewAPIError(http.StatusInternalServerError, TypeAPI, "internal_error",
			"Something went wrong on our side.")
	}
}

func codeForStatus(s int) string {
	switch s {
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusRequestEntityTooLarge:
		return "payload_too_large"
	case http.StatusUnsupportedMediaType:
		return "unsupported_media_type"
	default:
		if s >= 500 {
			return "internal_error"
		}
		return "invalid_request"
	}
}

// renderError is err in the one error shape, with the call's request id;
// server faults are logged.
func renderError(log *slog.Logger, err error, requestID string) *APIError {
	ae := *toAPIError(err)
	ae.RequestID = requestID
	if ae.Status >= 500 {
		log.Error("request failed", "request_id", ae.RequestID, "code", ae.Code, "err", err)
	}
	return &ae
}

// RenderError is err in the one error shape every edge response uses, with
// the call's request id, for an HTTP server other than the Server's own;
// a 401 also needs WWW-Authenticate (WWWAuthenticate). Server faults are
// logged.
func (s *Server) RenderError(err error, requestID string) *APIError {
	return renderError(s.log, err, requestID)
}

// MethodRouter is where routes are added: an *echo.Echo or an *echo.Group.
type MethodRouter interface {
	Match(methods []string, path string, h echo.HandlerFunc, m ...echo.MiddlewareFunc) []*echo.Route
}

// RefuseOtherMethods answers each of paths (relative to r, as its routes
// were added) with 405 method_not_allowed and an Allow header naming the
// methods it takes (paths[path], e.g. "GET, POST"), for every other method
// of RFC 9110's; an OPTIONS that is not a CORS preflight gets 204 with the
// same Allow. Without it, echo answers such a call under a group with
// middleware 404 not_found, as if the path did not exist, where the edge
// answers 405. The group's middleware runs first, so a call without a key
// is still a 401.
func RefuseOtherMethods(r MethodRouter, paths map[string]string) {
	for path, allow := range paths {
		took := map[string]bool{}
		for _, m := range strings.Split(allow, ",") {
			took[strings.TrimSpace(m)] = true
		}
		var others []string
		for _, m := range echoMethods {
			if !took[m] {
				others = append(others, m)
			}
		}
		refuse := func(c echo.Context) error {
			if c.Request().Method == http.MethodOptions {
				c.Response().Header().Set("Allow", allow+", "+http.MethodOptions)
				return c.NoContent(http.StatusNoContent)
			}
			ae := NewAPIError(http.StatusMethodNotAllowed, TypeInvalidRequest, "method_not_allowed",
				fmt.Sprintf("Method %s is not supported here; this path takes %s.", c.Request().Method, allow))
			ae.Allow = allow
			return ae
		}
		r.Match(others, path, refuse)
	}
}

// echoMethods are the methods echo routes by name: RFC 9110's and WebDAV's
// PROPFIND and REPORT.
var echoMethods = [...]string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
	http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace, echo.PROPFIND, echo.REPORT}

// RefuseUnknownMethods answers a method outside echoMethods with 501
// method_not_implemented: echo answered one 404 under a group, or 405 with
// an Allow header naming every method RefuseOtherMethods refuses. It runs
// as e's middleware, after those added before it (the request id's), on
// whatever the router found.
func RefuseUnknownMethods(e *echo.Echo) {
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			for _, m := range echoMethods {
				if c.Request().Method == m {
					return next(c)
				}
			}
			return NewAPIError(http.StatusNotImplemented, TypeInvalidRequest, "method_not_implemented",
				fmt.Sprintf("Method %s is not one this API knows.", strconv.QuoteToASCII(c.Request().Method)))
		}
	})
}

// ErrorJSON is the body of an error response.
func ErrorJSON(ae *APIError) ([]byte, error) {
	b, err := json.Marshal(map[string]*APIError{"error": ae})
	return append(b, '\n'), err
}

// WWWAuthenticate is the challenge sent with every 401.
const WWWAuthenticate = `Bearer realm="api"`

// errorHandler writes every error in the one shape and logs server faults.
func errorHandler(log *slog.Logger) echo.HTTPErrorHandler {
	return func(err error, c echo.Context) {
		if c.Response().Committed {
			return
		}
		ae := renderError(log, err, c.Response().Header().Get(HeaderRequestID))
		if ae.Status == http.StatusUnauthorized && c.Response().Header().Get("WWW-Authenticate") == "" {
			c.Response().Header().Set("WWW-Authenticate", WWWAuthenticate)
		}
		ae.SetHeaders(c.Response().Header().Get, c.Response().Header().Set)
		var werr error
		if c.Request().Method == http.MethodHead {
			werr = c.NoContent(ae.Status)
		} else {
			werr = c.JSON(ae.Status, map[string]*APIError{"error": ae})
		}
		if werr != nil {
			log.Warn("write error response", "err", werr)
		}
	}
}
