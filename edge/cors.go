package edge

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// CORSConfig lets browsers on other origins call the API, as publishable
// keys are meant to be used. Empty AllowedOrigins leaves CORS off: the edge
// adds no CORS header and passes the upstream's on, and a preflight is a
// call like any other (it carries no key, so it is refused).
type CORSConfig struct {
	// AllowedOrigins are origins ("https://app.example.com") whose pages
	// may call the API; "*" allows every origin.
	AllowedOrigins []string `yaml:"allowed_origins"`
	// MaxAge is how long a browser may cache a preflight's answer.
	MaxAge time.Duration `yaml:"max_age"`
}

func (c *CORSConfig) defaults() {
	if c.MaxAge == 0 {
		c.MaxAge = 10 * time.Minute
	}
}

func (c *CORSConfig) validate() error {
	var errs []error
	for _, o := range c.AllowedOrigins {
		if o == "*" {
			continue
		}
		if !IsOrigin(o) {
			errs = append(errs, fmt.Errorf("edge.cors.allowed_origins: %q is not an origin (scheme://host[:port], nothing after)", o))
		}
	}
	if c.MaxAge < 0 {
		errs = append(errs, errors.New("edge.cors.max_age: negative"))
	}
	return errors.Join(errs...)
}

// IsOrigin reports whether o is an origin as a browser sends it in
// Origin: http or https, a host, an optional port, nothing after. A
// browser's origin never matches an entry with a path or without a scheme.
func IsOrigin(o string) bool {
	u, err := url.Parse(o)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" && u.User == nil &&
		u.Path == "" && u.RawQuery == "" && u.Fragment == "" && !u.ForceQuery && !strings.HasSuffix(o, "#")
}

// exposedHeaders are the edge's own answer headers a browser's script may
// read: the call's id and where it stands against its limits.
const exposedHeaders = "Request-Id, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, RateLimit, RateLimit-Policy, Retry-After"

// CORS answers browsers' preflights and labels answers for the origins
// allowed. Both fronts use it.
type CORS struct {
	any     bool
	origins map[string]bool
	maxAge  string
}

// NewCORS returns nil when cfg allows no origin.
func NewCORS(cfg CORSConfig) *CORS {
	if len(cfg.AllowedOrigins) == 0 {
		return nil
	}
	c := &CORS{origins: map[string]bool{}, maxAge: strconv.Itoa(int(cfg.MaxAge / time.Second))}
	for _, o := range cfg.AllowedOrigins {
		if o == "*" {
			c.any = true
		}
		c.origins[strings.ToLower(o)] = true
	}
	return c
}

// IsPreflight reports whether a call is a browser's CORS preflight: an
// OPTIONS with an Origin and the method the page wants to use.
func IsPreflight(method, origin, requestMethod string) bool {
	return method == http.MethodOptions && origin != "" && requestMethod != ""
}

func (c *CORS) allowed(origin string) bool {
	return c.any || c.origins[strings.ToLower(origin)]
}

// Preflight answers a preflight from origin: the headers to set when the
// origin is allowed (the method and the request headers the page asked
// for, cached for max_age), or an error to answer with when it is not.
// A preflight carries no key; it is neither authenticated nor metered.
func (c *CORS) Preflight(origin, requestMethod, requestHeaders string, set func(name, value string)) error {
	set("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
	if !c.allowed(origin) {
		return NewAPIError(http.StatusForbidden, TypeInvalidRequest, "cors_origin_not_allowed",
			fmt.Sprintf("Calls from pages on %s are not allowed; the operator lists the origins allowed in edge.cors.allowed_origins.", origin))
	}
	set("Access-Control-Allow-Origin", origin)
	set("Access-Control-Allow-Methods", requestMethod)
	if requestHeaders != "" {
		set("Access-Control-Allow-Headers", requestHeaders)
	}
	set("Access-Control-Max-Age", c.maxAge)
	return nil
}

// Label sets the CORS headers of an answer (the upstream's, or the edge's
// own error) to a call from origin, when the origin is allowed, so the
// page can read it, its Request-Id and its rate-limit headers.
func (c *CORS) Label(origin string, set func(name, value string)) {
	set("Vary", "Origin")
	if origin == "" || !c.allowed(origin) {
		return
	}
	set("Access-Control-Allow-Origin", origin)
	set("Access-Control-Expose-Headers", exposedHeaders)
}

// IsCORSHeader reports whether an upstream's answer header is one the edge
// owns while CORS is on: the upstream's would contradict or repeat it.
func IsCORSHeader(name string) bool {
	return len(name) > len("Access-Control-") && strings.EqualFold(name[:len("Access-Control-")], "Access-Control-")
}
