package fasthttp

import (
	"testing"

	fh "github.com/valyala/fasthttp"
)

func TestStripHopByHop(t *testing.T) {
	cases := []struct {
		name       string
		set        map[string]string
		kept, gone []string
	}{
		{"headers without hop-by-hop ones are left whole", map[string]string{"X-Custom": "1", "Accept": "*/*"},
			[]string{"X-Custom", "Accept"}, nil},
		{"hop-by-hop headers are dropped", map[string]string{"Keep-Alive": "timeout=5", "Te": "trailers", "Upgrade": "websocket",
			"Proxy-Authorization": "Basic x", "X-Custom": "1"}, []string{"X-Custom"}, []string{"Keep-Alive", "Te", "Upgrade", "Proxy-Authorization"}},
		{"headers the Connection header names are dropped", map[string]string{"Connection": "X-Secret, keep-alive", "X-Secret": "s", "X-Custom": "1"},
			[]string{"X-Custom"}, []string{"X-Secret"}},
	}
	check := func(t *testing.T, h headers, kept, gone []string) {
		t.Helper()
		for _, k := range kept {
			if len(h.Peek(k)) == 0 {
				t.Errorf("%s was dropped", k)
			}
		}
		for _, k := range gone {
			if len(h.Peek(k)) != 0 {
				t.Errorf("%s was kept", k)
			}
		}
	}
	for _, c := range cases {
		t.Run("request: "+c.name, func(t *testing.T) {
			var h fh.RequestHeader
			for k, v := range c.set {
				h.Set(k, v)
			}
			stripRequestHopByHop(&h)
			check(t, &h, c.kept, c.gone)
		})
		t.Run("response: "+c.name, func(t *testing.T) {
			var h fh.ResponseHeader
			for k, v := range c.set {
				h.Set(k, v)
			}
			stripResponseHopByHop(&h)
			check(t, &h, c.kept, c.gone)
		})
	}
}

func TestOnlyTheEdgesOwnRoutesTakeTheSlowPath(t *testing.T) {
	cases := []struct {
		method, path string
		slow         bool
	}{
		{"GET", "/healthz", true},
		{"GET", "/readyz", true},
		{"POST", "/v1/events", true},
		{"GET", "/v1/events", false},
		{"POST", "/healthz", false},
		{"GET", "/v1/widgets/1", false},
		{"GET", "/healthz/x", false},
	}
	for _, c := range cases {
		if got := slowPath([]byte(c.method), []byte(c.path)); got != c.slow {
			t.Errorf("%s %s: slow path %v, want %v", c.method, c.path, got, c.slow)
		}
	}
}

func TestMethodKeepsEveryMethodAsSent(t *testing.T) {
	for _, m := range []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "get", ""} {
		if got := method([]byte(m)); got != m {
			t.Errorf("method(%q) = %q", m, got)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = method([]byte{'G', 'E', 'T'}) }); n != 0 {
		t.Errorf("method of GET allocates %.0f times", n)
	}
}
