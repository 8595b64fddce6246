package edge

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// RouteConfig maps a route pattern and its methods to the scopes a key needs.
//
// Patterns are paths whose segments are literals, "{name}" (any one
// segment) or a final "*" (the rest of the path): "/v1/widgets/{id}",
// "/v1/files/*". The pattern itself, not the raw path, becomes the usage
// event's route, so usage groups by endpoint and not by id.
type RouteConfig struct {
	Pattern string   `yaml:"pattern"`
	Methods []string `yaml:"methods"`
	// Scopes are all required; empty means any valid key may call.
	Scopes []string `yaml:"scopes"`
	// Write marks a route that changes state even though its method is
	// safe; methods other than GET, HEAD and OPTIONS are always writes.
	Write bool `yaml:"write"`
}

// Route is a matched route.
type Route struct {
	Template string
	Scopes   []string
	Write    bool
}

type compiledRoute struct {
	segs    []string
	tail    bool
	methods map[string]bool
	cfg     RouteConfig
}

// Router matches requests against the configured routes in order.
type Router struct {
	routes []compiledRoute
	// upper is set when a pattern has an upper-case letter.
	upper bool
}

// CaseMatters reports whether MatchFold could answer otherwise than Match
// for path: only when the path or a pattern has an upper-case letter.
func (r *Router) CaseMatters(path string) bool { return r.upper || hasUpper(path) }

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// NewRouter compiles the route table, reporting every bad entry.
func NewRouter(cfgs []RouteConfig) (*Router, error) {
	r := &Router{}
	var problems []string
	for i, c := range cfgs {
		if !strings.HasPrefix(c.Pattern, "/") {
			problems = append(problems, fmt.Sprintf("edge.routes[%d].pattern: must start with /", i))
			continue
		}
		cr := compiledRoute{cfg: c, methods: map[string]bool{}}
		segs := strings.Split(strings.Trim(c.Pattern, "/"), "/")
		for j, s := range segs {
			if s == "*" {
				if j != len(segs)-1 {
					problems = append(problems, fmt.Sprintf("edge.routes[%d].pattern: * only at the end", i))
				}
				cr.tail = true
				segs = segs[:j]
				break
			}
		}
		cr.segs = segs
		r.upper = r.upper || hasUpper(strings.Join(segs, "/"))
		for _, m := range c.Methods {
			m = strings.ToUpper(m)
			switch m {
			case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS":
				cr.methods[m] = true
			default:
				problems = append(problems, fmt.Sprintf("edge.routes[%d].methods: unknown method %q", i, m))
			}
		}
		for _, s := range c.Scopes {
			if s == "" || strings.ContainsAny(s, " ,") {
				problems = append(problems, fmt.Sprintf("edge.routes[%d].scopes: bad scope %q", i, s))
			}
		}
		r.routes = append(r.routes, cr)
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(problems, "\n"))
	}
	return r, nil
}

// Open reports whether no routes are configured: everything is proxied.
func (r *Router) Open() bool { return len(r.routes) == 0 }

// Match finds the first route for method and path. ok is false when routes
// are configured and none matches.
func (r *Router) Match(method, path string) (Route, bool) {
	return r.match(method, path, false)
}

// MatchFold is Match with literal segments compared without regard to
// case, as routers that ignore case (Express, ASP.NET) match.
func (r *Router) MatchFold(method, path string) (Route, bool) {
	return r.match(method, path, true)
}

func (r *Router) match(method, path string, fold bool) (Route, bool) {
	write := !safeMethod(method)
	if r.Open() {
		return Route{Template: path, Write: write}, true
	}
	segs := strings.Split(strings.Trim(path, "/"), "/")
	for i := range r.routes {
		cr := &r.routes[i]
		// HEAD is GET without the body: upstreams run their GET handler
		// for it, so a route that lists GET is HEAD's too.
		if len(cr.methods) > 0 && !cr.methods[method] && !(method == http.MethodHead && cr.methods[http.MethodGet]) {
			continue
		}
		if !matchSegs(cr.segs, cr.tail, segs, fold) {
			continue
		}
		return Route{Template: cr.cfg.Pattern, Scopes: cr.cfg.Scopes, Write: write || cr.cfg.Write}, true
	}
	return Route{}, false
}

func matchSegs(pat []string, tail bool, segs []string, fold bool) bool {
	if len(segs) == 1 && segs[0] == "" {
		segs = nil
	}
	if len(segs) < len(pat) || (!tail && len(segs) != len(pat)) {
		return false
	}
	for i, p := range pat {
		if strings.HasPrefix(p, "{") && strings.HasSuffix(p, "}") {
			if segs[i] == "" {
				return false
			}
			continue
		}
		if p != segs[i] && !(fold && strings.EqualFold(p, segs[i])) {
			return false
		}
	}
	return true
}

func safeMethod(m string) bool {
	return m == http.MethodGet || m == http.MethodHead || m == http.MethodOptions
}

// HasScope reports whether a key with scopes grants want. An empty scope
// list on a secret key is full access (a standard secret key); on a
// publishable key it is "*:read", every read scope. "*" grants everything,
// and a "*" part matches any part; at the start or the end of a scope it
// matches one or more parts: "*:read" grants "reports:daily:read",
// "widgets:*" grants "widgets:items:write", "a:*:c" only "a:<one part>:c".
func HasScope(kind KeyKind, scopes []string, want string) bool {
	if len(scopes) == 0 {
		return kind == Secret || scopeMatch(publishableScope, want)
	}
	for _, s := range scopes {
		if scopeMatch(s, want) {
			return true
		}
	}
	return false
}

// publishableScope is what a publishable key created without scopes grants,
// and is listed and sent upstream as.
const publishableScope = "*:read"

func scopeMatch(have, want string) bool {
	if have == "*" || have == want {
		return true
	}
	hp := strings.Split(have, ":")
	wp := strings.Split(want, ":")
	// A leading or trailing "*" takes one part or more; the parts between
	// take one each.
	lo, hi := 0, len(hp)
	if hp[0] == "*" {
		lo = 1
	}
	if hi-lo > 0 && hp[hi-1] == "*" {
		hi--
	}
	mid := hp[lo:hi]
	lead, trail := lo == 1, hi < len(hp)
	if !lead && !trail {
		return len(wp) == len(hp) && partsMatch(mid, wp)
	}
	// The first and last places mid may start at, leaving a star at least
	// one part on its side.
	first, last := 0, len(wp)-len(mid)
	if lead {
		first = 1
	}
	if trail {
		last--
	}
	if !lead {
		last = min(last, 0)
	}
	if !trail {
		first = max(first, len(wp)-len(mid))
	}
	for at := first; at <= last; at++ {
		if partsMatch(mid, wp[at:at+len(mid)]) {
			return true
		}
	}
	return false
}

// partsMatch matches scope parts one for one, a "*" part matching any part.
func partsMatch(have, want []string) bool {
	for i := range have {
		if have[i] != "*" && have[i] != want[i] {
			return false
		}
	}
	return true
}

func knownMethod(m string) bool {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS":
		return true
	}
	return false
}

// RoutePath is the path routes and scopes are matched on, from raw, the
// path exactly as the upstream gets it (still percent-encoded). Only what
// every server decodes alike is decoded: percent-encoded unreserved
// characters (letters, digits, "-", ".", "_", "~"), so "/v1/%77idgets" is
// "/v1/widgets". Everything else stays encoded, an encoded slash included:
// "/v1/files/a%2Fb" has the segments an upstream sees, which decodes it
// (or not) after splitting.
//
// A path a server could resolve to another route is refused
// (ErrAmbiguousPath): a "." or ".." segment, literal or encoded, between
// slashes or encoded slashes (an
// upstream that resolves them would serve another path than the one
// checked, one that does not would serve the path as sent, and the edge
// cannot know which), a backslash (some servers take it for a slash), or a
// malformed percent escape.
func RoutePath(raw string) (string, error) {
	if !strings.ContainsAny(raw, "%\\") && !strings.Contains(raw, "/.") {
		return raw, nil // the common case, without a copy
	}
	var b strings.Builder
	b.Grow(len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == '\\':
			return "", ErrAmbiguousPath
		case c != '%':
			b.WriteByte(c)
		case i+2 >= len(raw) || unhex(raw[i+1]) < 0 || unhex(raw[i+2]) < 0:
			return "", ErrAmbiguousPath
		default:
			d := byte(unhex(raw[i+1])<<4 | unhex(raw[i+2]))
			if unreserved(d) {
				b.WriteByte(d)
			} else if d == '\\' {
				return "", ErrAmbiguousPath
			} else {
				b.WriteByte('%')
				b.WriteByte(upperHex[d>>4])
				b.WriteByte(upperHex[d&15])
			}
			i += 2
		}
	}
	p := b.String()
	// A slash, dot or backslash encoded twice is one once a second layer
	// decodes it (a proxy in front of a router that decodes again).
	if u := strings.ToUpper(p); strings.Contains(u, "%252F") || strings.Contains(u, "%252E") || strings.Contains(u, "%255C") {
		return "", ErrAmbiguousPath
	}
	// Dot segments between encoded slashes count too: a server that
	// decodes "%2F" before resolving them (nginx does) would climb out. So
	// do those with path parameters, which Java servers drop ("..;x").
	for _, seg := range strings.Split(strings.ReplaceAll(p, "%2F", "/"), "/") {
		if i := strings.IndexByte(seg, ';'); i >= 0 {
			seg = seg[:i]
		}
		if seg == "." || seg == ".." {
			return "", ErrAmbiguousPath
		}
	}
	return p, nil
}

// OtherReadings are the ways an upstream might read p (a RoutePath) other
// than as it is: with encoded slashes decoded (nginx, and routers that
// match the decoded path), with repeated slashes merged (nginx's
// merge_slashes), with path parameters dropped (";x", as Java servers do),
// and all of these at once. A route must match every reading alike, or a
// key could be checked against one route and served by another. Nil when
// p has nothing to read otherwise, as almost every path.
func OtherReadings(p string) []string {
	slash, double, params := strings.Contains(p, "%2F"), strings.Contains(p, "//"), strings.IndexByte(p, ';') >= 0
	// Routers that take "x.json" for "x" (Spring MVC before 5.3) read
	// these otherwise too. (Case is Router.MatchFold's.)
	last := p[strings.LastIndexByte(p, '/')+1:]
	suffix := strings.IndexByte(last, '.') > 0
	if !slash && !double && !params && !suffix {
		return nil
	}
	decode := func(s string) string { return strings.ReplaceAll(s, "%2F", "/") }
	merge := func(s string) string {
		for strings.Contains(s, "//") {
			s = strings.ReplaceAll(s, "//", "/")
		}
		return s
	}
	drop := func(s string) string {
		segs := strings.Split(s, "/")
		for i, seg := range segs {
			if j := strings.IndexByte(seg, ';'); j >= 0 {
				segs[i] = seg[:j]
			}
		}
		return strings.Join(segs, "/")
	}
	var out []string
	if slash {
		out = append(out, decode(p))
	}
	if double || slash {
		out = append(out, merge(p), merge(decode(p)))
	}
	if params {
		out = append(out, drop(p), merge(drop(decode(p))))
	}
	if suffix {
		out = append(out, p[:len(p)-len(last)]+last[:strings.IndexByte(last, '.')])
	}
	return out
}

// ErrAmbiguousPath is a path RoutePath refuses; the call gets 400
// invalid_path.
var ErrAmbiguousPath = errors.New(`the path has a "." or ".." segment, a backslash or a malformed percent escape`)

const upperHex = "0123456789ABCDEF"

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c - 'a' + 10)
	case 'A' <= c && c <= 'F':
		return int(c - 'A' + 10)
	}
	return -1
}

func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
