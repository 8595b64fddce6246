package edge_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

func TestRoutePath(t *testing.T) {
	for _, c := range []struct{ raw, want string }{
		{"/v1/widgets/1", "/v1/widgets/1"},
		{"/v1/%77idgets/%31", "/v1/widgets/1"},
		{"/v1/files/a%2fb", "/v1/files/a%2Fb"},
		{"/v1/files/a%20b", "/v1/files/a%20b"},
		{"/v1/files/.hidden", "/v1/files/.hidden"},
		{"/v1/files/a..b", "/v1/files/a..b"},
		{"/v1/files/...", "/v1/files/..."},
		{"/", "/"},
	} {
		got, err := edge.RoutePath(c.raw)
		if err != nil || got != c.want {
			t.Errorf("RoutePath(%q) = %q, %v; want %q", c.raw, got, err, c.want)
		}
	}
	for _, raw := range []string{
		"/v1/public/../admin", "/v1/./admin", "/v1/admin/..", "/v1/admin/.",
		"/v1/admin/%2e%2e/files/x", "/v1/admin/%2E./files/x", "/v1/admin/.%2e/files/x", "/v1/%2e/admin",
		"/v1/files/..%2F..%2Fv1%2Fadmin%2Fusers", "/v1/files/a%2f..%2fb",
		"/v1/files\\..\\admin", "/v1/files/a%5cb", "/v1/files/%", "/v1/files/%2", "/v1/files/%zz",
		"/v1/files/..;/admin/users", "/v1/files/.;x/y", "/v1/files/a%252Fb", "/v1/files/%252e%252e/x",
	} {
		if got, err := edge.RoutePath(raw); !errors.Is(err, edge.ErrAmbiguousPath) {
			t.Errorf("RoutePath(%q) = %q, %v; want it refused", raw, got, err)
		}
	}
}

// A key with files:read only cannot reach the admin routes through dot
// segments, encoded or not, on either front: those paths are refused, and
// the upstream gets exactly the path whose route was checked.
func TestScopesHoldForDotSegmentsAndEncodedPaths(t *testing.T) {
	env := edgetest.New(t)
	got := make(chan string, 16)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.URL.EscapedPath()
		_, _ = io.WriteString(w, "ok")
	}))
	t.Cleanup(up.Close)
	routes := []edge.RouteConfig{
		{Pattern: "/v1/files/admin/keys", Methods: []string{"GET"}, Scopes: []string{"admin:read"}}, // the first that matches counts
		{Pattern: "/v1/files/*", Methods: []string{"GET"}, Scopes: []string{"files:read"}},
		{Pattern: "/v1/admin/*", Methods: []string{"GET"}, Scopes: []string{"admin:read"}},
		{Pattern: "/v1/widgets/export", Methods: []string{"GET"}, Scopes: []string{"admin:read"}},
		{Pattern: "/v1/widgets/{id}", Methods: []string{"GET"}, Scopes: []string{"files:read"}},
		{Pattern: "/v1/widgets/{id}/secrets", Methods: []string{"GET"}, Scopes: []string{"admin:read"}},
	}
	// An upstream URL with a path of its own gets the path as sent behind
	// it: the fasthttp front rebuilt it from the decoded path, so that
	// /v1/files/x%3By went up as /api/v1/files/x;y (a Java server's
	// /api/v1/files/x) and a%2Fb as a/b.
	for _, base := range []string{"", "/api"} {
		for _, fr := range fronts {
			t.Run(fr.name+" "+base, func(t *testing.T) {
				in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
					c.Routes, c.Upstream, c.SandboxUpstream = routes, up.URL+base, ""
				}})
				key, _ := env.Key(t, "acct_paths", edge.Secret, schemas.Live, "files:read")
				for _, c := range []struct {
					path   string
					status int
					code   string
				}{
					{"/v1/admin/users", 403, "insufficient_scope"},
					{"/v1/admin/%2e%2e/files/x", 400, "invalid_path"},
					{"/v1/admin/users/%2e%2e%2f%2e%2e/%2e%2e/files/y", 400, "invalid_path"},
					{"/v1/files/..%2F..%2Fv1%2Fadmin%2Fusers", 400, "invalid_path"},
					{"/v1/files/../admin/users", 400, "invalid_path"},
					{"/v1/%61dmin/users", 403, "insufficient_scope"},
					{"/v1/files/a%2Fb", 200, ""},
					{"/v1/%66iles/x", 200, ""},
					// Read otherwise by servers that decode encoded slashes,
					// merge slashes or drop ;parameters: another route.
					{"/v1/widgets/1%2Fsecrets", 400, "invalid_path"},
					{"/v1/widgets/1%2fsecrets", 400, "invalid_path"},
					{"/v1//admin/users", 400, "invalid_path"},
					{"/v1/admin;x/users", 400, "invalid_path"},
					{"/v1/files/..;/admin/users", 400, "invalid_path"},
					{"/v1/widgets/export", 403, "insufficient_scope"},
					{"/v1/widgets/EXPORT", 400, "invalid_path"},        // routers that ignore case
					{"/v1/widgets/export.json", 400, "invalid_path"},   // Spring's suffix match
					{"/v1/widgets/1%252Fsecrets", 400, "invalid_path"}, // decoded twice
					// Two readings at once: case and another (nginx merging
					// slashes before a case-blind application router).
					{"/v1/files//ADMIN/keys", 400, "invalid_path"},
					{"/v1/files/ADMIN%2Fkeys", 400, "invalid_path"},
					{"/v1/files/admin/KEYS.json", 400, "invalid_path"},
					{"/v1/files/admin/keys", 403, "insufficient_scope"},
					// The same route however read: passed as sent.
					{"/v1/widgets/ABC", 200, ""},
					{"/v1/files/report.pdf", 200, ""},
					{"/v1/files/x;v=1", 200, ""},
					{"/v1/files//x", 200, ""},
					{"/v1/files/x%3By", 200, ""},
					{"/v1/files/a%2F%2Fb%40c", 200, ""},
				} {
					status, body := rawGet(t, in.URL, c.path, key)
					if status != c.status || (c.code != "" && !strings.Contains(body, `"code":"`+c.code+`"`)) {
						t.Errorf("GET %s: %d %s; want %d %s", c.path, status, body, c.status, c.code)
						continue
					}
					if status == 200 {
						if p := <-got; p != base+c.path {
							t.Errorf("GET %s: the upstream got %s, want %s: the path as sent", c.path, p, base+c.path)
						}
					}
				}
				select {
				case p := <-got:
					t.Errorf("a refused call reached the upstream: %s", p)
				default:
				}
			})
		}
	}
}

// rawGet sends GET path exactly as given, which net/http's client would
// clean up first, and returns the status and body.
func rawGet(t *testing.T, base, path, key string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	testenv.Must(t, err, "dial the edge")
	defer conn.Close()
	_, err = fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: edge.test\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n", path, key)
	testenv.Must(t, err, "write the request")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	testenv.Must(t, err, "read the answer")
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// A call to a path of bytes that are not UTF-8, or to a long non-ASCII
// path, is served and its event is one ingest takes: the route was the
// path as sent, cut at 256 bytes, and ingest read each stray byte as
// U+FFFD (3 bytes), found the route too long and dead-lettered the event,
// so the call was never billed. An upstream status outside 100-599 made
// the same kind of event. Each event now decodes, with its route written
// as valid UTF-8 of at most 256 bytes.
func TestEventsOfOddPathsAndStatusesAreOnesIngestTakes(t *testing.T) {
	env := edgetest.New(t)
	odd := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/odd-status") {
			w.WriteHeader(999)
			return
		}
		env.Live.ServeHTTP(w, r)
	}))
	t.Cleanup(odd.Close)
	env.LiveURL = odd.URL
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_odd_paths", edge.Secret, schemas.Live)
	paths := []string{
		"/v1/" + strings.Repeat("\xff", 90),
		"/v1/x" + strings.Repeat("é", 200),
		"/v1/caf\xe9",
	}
	for _, p := range paths {
		if status, body := rawGet(t, in.URL, p, key); status != 200 {
			t.Fatalf("GET %q: %d %s", p, status, body)
		}
	}
	if status, _ := rawGet(t, in.URL, "/v1/odd-status", key); status != 999 {
		t.Fatalf("GET /v1/odd-status: %d, want the upstream's 999", status)
	}
	// ReadTopic fails the test on a record that does not decode.
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, len(paths)+1, 20*time.Second)
	routes := map[string]int{}
	for _, e := range evs {
		if !utf8.ValidString(e.Route) || len(e.Route) > schemas.MaxRouteLength {
			t.Errorf("event route %q (%d bytes) is not valid UTF-8 of at most %d bytes", e.Route, len(e.Route), schemas.MaxRouteLength)
		}
		routes[e.Route] = e.Status
	}
	if len(evs) != len(paths)+1 {
		t.Fatalf("%d events for %d calls", len(evs), len(paths)+1)
	}
	if st, ok := routes["/v1/caf%E9"]; !ok || st != 200 {
		t.Errorf("routes %v; want /v1/caf%%E9 with status 200 among them", routes)
	}
	if st, ok := routes["/v1/odd-status"]; !ok || st != 0 {
		t.Errorf("routes %v; want /v1/odd-status metered without a status", routes)
	}
}
