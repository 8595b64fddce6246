package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tollgate-dev/tollgate/edge"
)

func TestDashboardServesPagesAndForwardsEachAPIWithTheCallersKey(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{}
	auth := func(k string) string { mu.Lock(); defer mu.Unlock(); return seen[k] }
	api := func(name string) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen[name+" "+r.URL.Path] = r.Header.Get("Authorization")
			seen[name+" "+r.URL.Path+" forwarded for"] = r.Header.Get("X-Forwarded-For")
			mu.Unlock()
			_, _ = io.WriteString(w, `{"from":"`+name+`"}`)
		}))
	}
	usage, billing := api("usage"), api("billing")
	defer usage.Close()
	defer billing.Close()
	m := runDashboard(t, usage.URL, billing.URL)
	base := "http://" + m.Addr()

	get := func(path string) (int, string, http.Header) {
		req, _ := http.NewRequest("GET", base+path, nil)
		req.Header.Set("Authorization", "Bearer pk_live_example")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header
	}
	t.Run("the page is served with a restrictive content security policy", func(t *testing.T) {
		code, body, h := get("/")
		if code != 200 || !strings.Contains(body, "<title>Tollgate") {
			t.Fatalf("GET / = %d %.80q", code, body)
		}
		if !strings.Contains(h.Get("Content-Security-Policy"), "default-src 'self'") {
			t.Fatalf("CSP %q", h.Get("Content-Security-Policy"))
		}
		// No other site may frame the page (and click through it).
		if !strings.Contains(h.Get("Content-Security-Policy"), "frame-ancestors 'none'") || h.Get("X-Frame-Options") != "DENY" {
			t.Fatalf("CSP %q, X-Frame-Options %q: the page may be framed", h.Get("Content-Security-Policy"), h.Get("X-Frame-Options"))
		}
	})
	routes := []struct{ path, to string }{
		{"/v1/usage", "usage"}, {"/v1/requests", "usage"}, {"/v1/meters", "usage"},
		{"/v1/usage/current", "billing"}, {"/v1/invoices", "billing"},
		{"/v1/invoices/upcoming", "billing"}, {"/v1/invoices/inv_1", "billing"},
	}
	for _, r := range routes {
		t.Run(r.path+" goes to the "+r.to+" API with the caller's key", func(t *testing.T) {
			code, body, h := get(r.path)
			if code != 200 || body != `{"from":"`+r.to+`"}` {
				t.Fatalf("GET %s = %d %s", r.path, code, body)
			}
			if h.Get("Cache-Control") != "no-store" {
				t.Fatalf("GET %s: Cache-Control %q; an account's data must not be kept by the browser", r.path, h.Get("Cache-Control"))
			}
			if got := auth(r.to + " " + r.path); got != "Bearer pk_live_example" {
				t.Fatalf("%s API saw Authorization %q", r.to, got)
			}
			// The caller's address goes on, for the API's audit log.
			if got := auth(r.to + " " + r.path + " forwarded for"); got != "127.0.0.1" {
				t.Fatalf("%s API saw X-Forwarded-For %q, want the caller's address", r.to, got)
			}
		})
	}
	t.Run("an API that is down is a 502 with a machine-readable error", func(t *testing.T) {
		billing.Close()
		code, body, h := get("/v1/invoices")
		var e struct {
			Error struct {
				Type, Code, Message string
				RequestID           string `json:"request_id"`
				DocURL              string `json:"doc_url"`
			}
		}
		if err := json.Unmarshal([]byte(body), &e); err != nil || code != http.StatusBadGateway || e.Error.Code != "upstream_unavailable" ||
			e.Error.Type != "api_error" || e.Error.DocURL == "" || e.Error.RequestID == "" || h.Get("Request-Id") != e.Error.RequestID {
			t.Fatalf("got %d %s (Request-Id %q), want the one error shape with its request id", code, body, h.Get("Request-Id"))
		}
	})
}

// TestTheDashboardPassesOnOnlyATrustedProxysChain: behind a load balancer
// listed in dashboard.trusted_proxies, the caller the balancer forwarded
// for goes on as X-Forwarded-For, so the usage and invoice APIs, which
// trust the dashboard alone, name the caller; from anyone else only the
// caller's own address goes on.
func TestTheDashboardPassesOnOnlyATrustedProxysChain(t *testing.T) {
	var mu sync.Mutex
	var forwarded []string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		forwarded = r.Header.Values("X-Forwarded-For")
		mu.Unlock()
	}))
	defer api.Close()
	lb, err := edge.ParseTrustedProxies("dashboard.trusted_proxies", []string{"10.0.0.5"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		trusted edge.TrustedProxies
		peer    string
		want    string
	}{
		{"behind a trusted balancer, the caller it forwarded for", lb, "10.0.0.5:4431", "203.0.113.9"},
		{"an untrusted caller's header is not passed on", lb, "198.51.100.7:4431", "198.51.100.7"},
		{"without trusted proxies, only the caller's address", nil, "10.0.0.5:4431", "10.0.0.5"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, err := forwardTo(api.URL, c.trusted, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			req := httptest.NewRequest(http.MethodGet, "/v1/usage", nil)
			req.RemoteAddr = c.peer
			req.Header.Set("X-Forwarded-For", "203.0.113.9")
			h.ServeHTTP(httptest.NewRecorder(), req)
			mu.Lock()
			got := strings.Join(forwarded, ", ")
			mu.Unlock()
			if got != c.want {
				t.Fatalf("the API saw X-Forwarded-For %q, want %q", got, c.want)
			}
		})
	}
}

// The dashboard answers the probes every component answers: /healthz while
// it serves, /readyz only while the usage and invoice APIs it forwards to
// are ready, naming the one that is not. Before, both were 404, so a probe
// set up like the other components' never passed.
func TestTheDashboardAnswersProbesForItselfAndTheAPIsBehindIt(t *testing.T) {
	var usageDown atomic.Bool
	api := func(down *atomic.Bool) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/readyz" && down != nil && down.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		}))
	}
	usage, billing := api(&usageDown), api(nil)
	defer usage.Close()
	defer billing.Close()
	m := runDashboard(t, usage.URL, billing.URL)
	probe := func(path string) (int, string) {
		resp, err := http.Get("http://" + m.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := probe("/healthz"); code != 200 {
		t.Fatalf("/healthz %d", code)
	}
	if code, body := probe("/readyz"); code != 200 {
		t.Fatalf("/readyz with both APIs ready: %d %s", code, body)
	}
	usageDown.Store(true)
	if code, body := probe("/readyz"); code != 503 || !strings.Contains(body, "usage API") || strings.Contains(body, "invoice API") {
		t.Fatalf("/readyz with the usage API not ready: %d %q; want 503 naming it alone", code, body)
	}
	usageDown.Store(false)
	billing.Close() // gone altogether
	if code, body := probe("/readyz"); code != 503 || !strings.Contains(body, "invoice API") {
		t.Fatalf("/readyz with the invoice API gone: %d %q; want 503 naming it", code, body)
	}
}

// runDashboard serves a dashboard forwarding to usageAPI and invoiceAPI
// until the test ends.
func runDashboard(t *testing.T, usageAPI, invoiceAPI string) *DashboardMain {
	t.Helper()
	m, err := NewDashboardMain("127.0.0.1:0", usageAPI, invoiceAPI, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; _ = m.Close() })
	return m
}
