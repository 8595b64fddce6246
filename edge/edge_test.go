package edge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

var widgetRoutes = []edge.RouteConfig{
	{Pattern: "/v1/widgets", Methods: []string{"GET"}, Scopes: []string{"widgets:read"}},
	{Pattern: "/v1/widgets/{id}", Methods: []string{"GET", "HEAD"}, Scopes: []string{"widgets:read"}},
	{Pattern: "/v1/widgets", Methods: []string{"POST"}, Scopes: []string{"widgets:write"}},
	{Pattern: "/v1/widgets/{id}", Methods: []string{"DELETE", "PATCH"}, Scopes: []string{"widgets:write"}},
	{Pattern: "/v1/invoices/*", Methods: []string{"GET"}, Scopes: []string{"invoices:read"}},
}

func withRoutes(c *edge.Config) { c.Routes = widgetRoutes }

func TestKeyAndScopeRules(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{Config: withRoutes})
	ctx := context.Background()
	secret, _ := env.Key(t, "acct_rules", edge.Secret, schemas.Live)
	readOnly, _ := env.Key(t, "acct_rules", edge.Secret, schemas.Live, "widgets:read")
	pub, _ := env.Key(t, "acct_rules", edge.Publishable, schemas.Live)
	expired, expiredID := env.Key(t, "acct_rules", edge.Secret, schemas.Live)
	_, err := env.PG.Pool.Exec(ctx, `UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1`, expiredID)
	testenv.Must(t, err, "expire key")
	revoked, revokedID := env.Key(t, "acct_rules", edge.Secret, schemas.Live)
	_, err = env.Store.RevokeKey(ctx, revokedID, time.Now(), edge.AuditInfo{Actor: "test"})
	testenv.Must(t, err, "revoke")
	unknown, _, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate")

	cases := []struct {
		name, method, path, key string
		status                  int
		code                    string
	}{
		{"secret key reads", "GET", "/v1/widgets/42", secret, 200, ""},
		{"secret key writes", "POST", "/v1/widgets", secret, 200, ""},
		{"expired key is refused", "GET", "/v1/widgets/1", expired, 401, "expired_api_key"},
		{"revoked key is refused", "GET", "/v1/widgets/1", revoked, 401, "revoked_api_key"},
		{"unknown key is refused", "GET", "/v1/widgets/1", unknown, 401, "invalid_api_key"},
		{"read-scoped key reads", "GET", "/v1/widgets/1", readOnly, 200, ""},
		{"read-scoped key is denied a write route", "DELETE", "/v1/widgets/1", readOnly, 403, "insufficient_scope"},
		{"read-scoped key is denied another resource", "GET", "/v1/invoices/in_1", readOnly, 403, "insufficient_scope"},
		{"publishable key reads", "GET", "/v1/widgets", pub, 200, ""},
		{"publishable key can never write", "POST", "/v1/widgets", pub, 403, "publishable_key_not_allowed"},
		{"unconfigured route is not found", "GET", "/v1/secrets", secret, 404, "route_not_found"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := edgetest.Do(t, c.method, in.URL+c.path, c.key, nil)
			if r.Status != c.status || r.Error.Code != c.code {
				t.Fatalf("%s %s: status %d code %q, want %d %q (%s)", c.method, c.path, r.Status, r.Error.Code, c.status, c.code, r.Body)
			}
			if r.Header.Get(edge.HeaderRequestID) == "" {
				t.Fatal("no Request-Id header")
			}
			if c.status >= 400 && (r.Error.RequestID != r.Header.Get(edge.HeaderRequestID) || r.Error.DocURL == "" || r.Error.Type == "") {
				t.Fatalf("error body %+v is not in the one error shape", r.Error)
			}
		})
	}
}

// A method-override header naming another method than the one sent is
// refused: routes and scopes are checked on the method sent, and an
// upstream framework honouring the header would run the other one (a key
// allowed only POST could have it DELETE). Both fronts.
func TestAMethodOverrideCannotGetAroundScopes(t *testing.T) {
	for _, front := range []struct {
		name    string
		netHTTP bool
	}{{"fasthttp", false}, {"net/http", true}} {
		t.Run(front.name, func(t *testing.T) {
			env := edgetest.New(t)
			in := env.Start(t, edgetest.Options{Config: withRoutes, NetHTTP: front.netHTTP})
			writer, _ := env.Key(t, "acct_override", edge.Secret, schemas.Live, "widgets:write")
			call := func(method, path string, headers [][2]string) edgetest.Response {
				t.Helper()
				req, err := http.NewRequest(method, in.URL+path, nil)
				testenv.Must(t, err, "request")
				req.Header.Set("Authorization", "Bearer "+writer)
				for _, h := range headers {
					req.Header.Add(h[0], h[1])
				}
				return edgetest.DoRequest(t, req)
			}
			for _, c := range []struct {
				name, method, query string
				headers             [][2]string
				status              int
				code                string
			}{
				{"POST asking for DELETE", "POST", "", [][2]string{{"X-HTTP-Method-Override", "DELETE"}}, 400, "method_override_not_allowed"},
				{"POST asking for GET", "POST", "", [][2]string{{"X-HTTP-Method", "get"}}, 400, "method_override_not_allowed"},
				{"POST asking for PUT", "POST", "", [][2]string{{"x-method-override", "PUT"}}, 400, "method_override_not_allowed"},
				// Frameworks differ in which header, and which value, they read.
				{"POST naming itself in one header, DELETE in another", "POST", "",
					[][2]string{{"X-HTTP-Method-Override", "POST"}, {"X-HTTP-Method", "DELETE"}}, 400, "method_override_not_allowed"},
				{"POST naming itself, then DELETE in a second line", "POST", "",
					[][2]string{{"X-HTTP-Method-Override", "POST"}, {"X-HTTP-Method-Override", "DELETE"}}, 400, "method_override_not_allowed"},
				{"POST naming itself", "POST", "", [][2]string{{"X-HTTP-Method-Override", "post"}}, 200, ""},
				{"POST naming itself twice", "POST", "", [][2]string{{"X-HTTP-Method-Override", "POST"}, {"X-Method-Override", "post"}}, 200, ""},
				{"POST without one", "POST", "", nil, 200, ""},
				// The _method query parameter, which Laravel, Symfony and
				// Express's method-override('_method') read too.
				{"POST asking for DELETE in the query", "POST", "?_method=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE in an escaped query name", "POST", "?a=1&%5Fmethod=delete", nil, 400, "method_override_not_allowed"},
				{"POST naming itself in the query", "POST", "?_method=POST&x=%20", nil, 200, ""},
				{"POST with another parameter ending in _method", "POST", "?http_method=DELETE", nil, 200, ""},
				// An empty value is read past, by the frameworks and here.
				{"POST with an empty _method, then DELETE", "POST", "?_method=&_method=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST with an empty header and DELETE in the query", "POST", "?_method=DELETE", [][2]string{{"X-HTTP-Method-Override", " "}}, 400, "method_override_not_allowed"},
				{"POST with an empty header, then DELETE in another", "POST", "",
					[][2]string{{"X-HTTP-Method-Override", ""}, {"X-HTTP-Method", "DELETE"}}, 400, "method_override_not_allowed"},
				{"POST with only an empty override", "POST", "?_method=", [][2]string{{"X-HTTP-Method-Override", ""}}, 200, ""},
				// PHP reads these names as _method.
				{"POST asking for DELETE as .method", "POST", "?.method=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE as %2Emethod", "POST", "?%2Emethod=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE as +_method", "POST", "?+_method=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE as %20.method", "POST", "?%20.method=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE as _method%00", "POST", "?_method%00=DELETE", nil, 400, "method_override_not_allowed"},
				{"POST asking for DELETE as %5Fmethod%00x", "POST", "?%5Fmethod%00x=DELETE", nil, 400, "method_override_not_allowed"},
			} {
				r := call(c.method, "/v1/widgets"+c.query, c.headers)
				if r.Status != c.status || r.Error.Code != c.code {
					t.Errorf("%s: %d %q, want %d %q (%s)", c.name, r.Status, r.Error.Code, c.status, c.code, r.Body)
				}
			}
		})
	}
}

func TestMalformedKeysNeverReachTheDatabase(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	good, _ := env.Key(t, "acct_malformed", edge.Secret, schemas.Live)
	flip := []byte(good)
	flip[20] = map[bool]byte{true: 'A', false: 'B'}[flip[20] != 'A']
	bad := []string{
		"hello", "sk_live_", good[:len(good)-1], good + "x", "xk" + good[2:], "sk_prod_" + good[8:],
		string(flip), strings.ToUpper(good[:3]) + good[3:], good[:10] + "!" + good[11:],
	}
	for i, k := range bad {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", k, nil)
		if r.Status != 401 || r.Error.Code != "malformed_api_key" {
			t.Fatalf("bad key %d: status %d code %q", i, r.Status, r.Error.Code)
		}
	}
	if n := in.Store.N.Load(); n != 0 {
		t.Fatalf("%d database lookups for %d malformed keys, want 0", n, len(bad))
	}
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", good, nil)
	if r.Status != 200 || in.Store.N.Load() != 1 {
		t.Fatalf("good key: status %d, lookups %d, want 200 and 1", r.Status, in.Store.N.Load())
	}
	r = edgetest.Do(t, "GET", in.URL+"/v1/x", good, nil)
	if r.Status != 200 || in.Store.N.Load() != 1 {
		t.Fatalf("cached key: status %d, lookups %d, want 200 and still 1", r.Status, in.Store.N.Load())
	}
}

func TestRevokedKeyIsRefusedBySecondInstanceWithinOneSecond(t *testing.T) {
	env := edgetest.New(t)
	a := env.Start(t, edgetest.Options{})
	b := env.Start(t, edgetest.Options{})
	key, id := env.Key(t, "acct_revoke", edge.Secret, schemas.Live)
	for _, in := range []*edgetest.Instance{a, b} {
		// Warm both caches so only the notification can save us.
		for i := 0; i < 2; i++ {
			if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 200 {
				t.Fatalf("before revocation: status %d", r.Status)
			}
		}
	}
	lookups := b.Store.N.Load()
	_, err := env.Store.RevokeKey(context.Background(), id, time.Now(), edge.AuditInfo{Actor: "test", Reason: "leaked"})
	testenv.Must(t, err, "revoke")
	revokedAt := time.Now()
	// Each instance hears the notification on its own listener, so each
	// gets its own one-second allowance, measured from the revocation.
	for name, in := range map[string]*edgetest.Instance{"first": a, "second": b} {
		for {
			r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
			if r.Status == 401 && r.Error.Code == "revoked_api_key" {
				t.Logf("revocation reached the %s instance after %s", name, time.Since(revokedAt))
				break
			}
			if r.Status != 200 {
				t.Fatalf("%s instance: status %d %s", name, r.Status, r.Body)
			}
			if time.Since(revokedAt) > time.Second {
				t.Fatalf("the %s instance still served the revoked key after %s", name, time.Since(revokedAt))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if b.Store.N.Load() == lookups {
		t.Fatal("the second instance refused without looking the key up again: the cache was not invalidated")
	}
	// And never again after that.
	for i := 0; i < 20; i++ {
		for _, in := range []*edgetest.Instance{a, b} {
			if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 401 {
				t.Fatalf("revoked key served again: status %d", r.Status)
			}
		}
	}
}

func TestKeyCacheIsBypassedWhileListenerIsDown(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_untrusted", edge.Secret, schemas.Live)
	in.Cache.SetTrusted(false)
	for i := 0; i < 3; i++ {
		if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 200 {
			t.Fatalf("status %d", r.Status)
		}
	}
	if n := in.Store.N.Load(); n != 3 {
		t.Fatalf("%d lookups with an untrusted cache, want 3 (one per call)", n)
	}
}

func TestTestKeyGoesToSandboxAndIsMeteredAsTest(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{Config: withRoutes})
	testKey, testID := env.Key(t, "acct_sandbox", edge.Secret, schemas.Test)
	liveKey, liveID := env.Key(t, "acct_sandbox", edge.Secret, schemas.Live)
	for i := 0; i < 3; i++ {
		if r := edgetest.Do(t, "GET", in.URL+fmt.Sprintf("/v1/widgets/%d", i), testKey, nil); r.Status != 200 {
			t.Fatalf("test call: %d", r.Status)
		}
	}
	if r := edgetest.Do(t, "GET", in.URL+"/v1/widgets/9", liveKey, nil); r.Status != 200 {
		t.Fatalf("live call: %d", r.Status)
	}
	if env.Sandbox.Calls() != 3 || env.Live.Calls() != 1 {
		t.Fatalf("sandbox served %d, live %d; want 3 and 1", env.Sandbox.Calls(), env.Live.Calls())
	}
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 4, 20*time.Second)
	if len(evs) != 4 {
		t.Fatalf("%d events, want 4", len(evs))
	}
	byEnv := map[schemas.Environment]int{}
	for _, ev := range evs {
		byEnv[ev.Environment]++
		if ev.Route != "/v1/widgets/{id}" {
			t.Errorf("event route %q, want the template /v1/widgets/{id}", ev.Route)
		}
		wantKey := liveID
		if ev.Environment == schemas.Test {
			wantKey = testID
		}
		if ev.KeyID != wantKey || ev.AccountID != "acct_sandbox" || ev.Type != "api_call" || ev.Units != 1 {
			t.Errorf("event %+v", ev)
		}
	}
	// Test-mode events carry env=test, which the invoicer never bills.
	if byEnv[schemas.Test] != 3 || byEnv[schemas.Live] != 1 {
		t.Fatalf("events by environment %v, want 3 test and 1 live", byEnv)
	}
}

func slowServer(t *testing.T) string {
	return serveUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	}))
}

func TestRateLimitHeadersThroughAWindow(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_window", edge.Secret, schemas.Live)
	env.SetPlan(t, "acct_window", "tiny", edge.Limits{RequestsPerSecond: 1, Burst: 5}, "https://example.test/upgrade")
	for i := 0; i < 5; i++ {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		if r.Status != 200 {
			t.Fatalf("call %d: %d %s", i, r.Status, r.Body)
		}
		wantRemaining := 4 - i
		h := r.Header
		if h.Get("X-RateLimit-Limit") != "5" || h.Get("X-RateLimit-Remaining") != strconv.Itoa(wantRemaining) {
			t.Fatalf("call %d: limit %s remaining %s, want 5 and %d", i, h.Get("X-RateLimit-Limit"), h.Get("X-RateLimit-Remaining"), wantRemaining)
		}
		// Reset: seconds until the bucket is full again, one per used call.
		reset, _ := strconv.Atoi(h.Get("X-RateLimit-Reset"))
		if reset < i || reset > i+1 {
			t.Fatalf("call %d: reset %d, want %d..%d", i, reset, i, i+1)
		}
		if got := h.Get("RateLimit-Policy"); got != `"key";q=5;w=5, "account";q=5;w=5` {
			t.Fatalf("RateLimit-Policy %q", got)
		}
		if got, want := h.Get("RateLimit"), fmt.Sprintf(`"key";r=%d;t=%d`, wantRemaining, reset); got != want && h.Get("RateLimit") != fmt.Sprintf(`"account";r=%d;t=%d`, wantRemaining, reset) {
			t.Fatalf("RateLimit %q, want %q", got, want)
		}
	}
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
	if r.Status != 429 || r.Error.Code != "rate_limited" || r.Error.Limit != "key" || r.Error.Type != edge.TypeRateLimit {
		t.Fatalf("6th call: %d %+v", r.Status, r.Error)
	}
	if r.Header.Get("Retry-After") != "1" || r.Error.RetryAfter == nil || *r.Error.RetryAfter != 1 || r.Error.RetryAt == "" {
		t.Fatalf("Retry-After %q body %+v", r.Header.Get("Retry-After"), r.Error)
	}
	if r.Error.UpgradeURL != "https://example.test/upgrade" || r.Header.Get("X-RateLimit-Remaining") != "0" {
		t.Fatalf("upgrade url %q remaining %q", r.Error.UpgradeURL, r.Header.Get("X-RateLimit-Remaining"))
	}
	// One second later exactly one more call fits.
	time.Sleep(1100 * time.Millisecond)
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 200 || r.Header.Get("X-RateLimit-Remaining") != "0" {
		t.Fatalf("after 1s: %d remaining %s", r.Status, r.Header.Get("X-RateLimit-Remaining"))
	}
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 429 {
		t.Fatalf("after the refill was used: %d", r.Status)
	}
}

func TestTwoInstancesShareOneLimit(t *testing.T) {
	env := edgetest.New(t)
	a := env.Start(t, edgetest.Options{})
	b := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_shared", edge.Secret, schemas.Live)
	const rps, burst = 20, 40
	env.SetPlan(t, "acct_shared", "shared", edge.Limits{RequestsPerSecond: rps, Burst: burst}, "")
	start := time.Now()
	allowed := 0
	for i := 0; i < 300; i++ {
		in := a
		if i%2 == 1 {
			in = b
		}
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		switch r.Status {
		case 200:
			allowed++
		case 429:
		default:
			t.Fatalf("status %d", r.Status)
		}
	}
	elapsed := time.Since(start)
	// GCRA allows the burst plus rps per second elapsed; the slack of 1
	// covers the emission interval straddling the end of the run.
	ceiling := burst + int(float64(rps)*elapsed.Seconds()) + 1
	if allowed < burst || allowed > ceiling {
		t.Fatalf("two instances allowed %d calls in %s; want between %d and %d", allowed, elapsed, burst, ceiling)
	}
	t.Logf("allowed %d of 300 in %s (ceiling %d)", allowed, elapsed, ceiling)
}

func TestRedisDownFallsBackToLocalLimitPerInstance(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{RedisAddr: "127.0.0.1:1", Config: func(c *edge.Config) { c.ExpectedInstances = 2 }})
	key, _ := env.Key(t, "acct_noredis", edge.Secret, schemas.Live)
	env.SetPlan(t, "acct_noredis", "fallback", edge.Limits{RequestsPerSecond: 1, Burst: 10}, "")
	allowed := 0
	for i := 0; i < 12; i++ {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		if r.Status == 200 {
			allowed++
		} else if r.Status != 429 {
			t.Fatalf("status %d %s", r.Status, r.Body)
		}
	}
	// Burst 10 over 2 expected instances: 5 each, locally.
	if allowed != 5 {
		t.Fatalf("allowed %d with Redis down, want 5 (burst 10 / 2 instances)", allowed)
	}
}

// With Redis down each instance counts its share of the monthly quota, and
// says so: the headers count down from the share, and the 429 names it.
func TestRedisDownQuotaHeadersSpeakOfTheInstancesShare(t *testing.T) {
	env := edgetest.New(t)
	clock := quotaClock(time.Now())
	in := env.Start(t, edgetest.Options{RedisAddr: "127.0.0.1:1", Now: clock,
		Config: func(c *edge.Config) { c.ExpectedInstances = 2 }})
	key, _ := env.Key(t, "acct_noredis_quota", edge.Secret, schemas.Live)
	four := int64(4)
	env.SetPlan(t, "acct_noredis_quota", "fallback_quota", edge.Limits{RequestsPerSecond: 100, Burst: 100, MonthlyRequests: &four}, "")
	for i, want := range []string{"1", "0"} {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		if r.Status != 200 || r.Header.Get("X-RateLimit-Limit") != "2" || r.Header.Get("X-RateLimit-Remaining") != want ||
			r.Header.Get("RateLimit") != `"monthly";r=`+want+";t="+r.Header.Get("X-RateLimit-Reset") {
			t.Fatalf("call %d: status %d, X-RateLimit-Limit %q, -Remaining %q, RateLimit %q; want 200, this instance's share 2, %s left",
				i+1, r.Status, r.Header.Get("X-RateLimit-Limit"), r.Header.Get("X-RateLimit-Remaining"), r.Header.Get("RateLimit"), want)
		}
	}
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
	if r.Status != 429 || r.Error.Code != "quota_exceeded" || r.Header.Get("X-RateLimit-Limit") != "2" ||
		r.Header.Get("X-RateLimit-Remaining") != "0" || !strings.Contains(r.Error.Message, "share (2 requests") {
		t.Fatalf("call 3: status %d, code %q, X-RateLimit-Limit %q, -Remaining %q, message %q; want 429 quota_exceeded naming this instance's share of 2",
			r.Status, r.Error.Code, r.Header.Get("X-RateLimit-Limit"), r.Header.Get("X-RateLimit-Remaining"), r.Error.Message)
	}
	// The share holds until Redis is asked again (the fallback's cooldown,
	// a second), not until the month's end: a caller that honours
	// Retry-After would otherwise stop for days over a short outage.
	at, err := time.Parse(time.RFC3339Nano, r.Error.RetryAt)
	if r.Header.Get("Retry-After") != "1" || r.Header.Get("X-RateLimit-Reset") != "1" || r.Error.RetryAfter == nil || *r.Error.RetryAfter != 1 ||
		err != nil || at.Sub(clock()) > 2*time.Second || strings.Contains(r.Error.Message, "until") {
		t.Fatalf("call 3: Retry-After %q, X-RateLimit-Reset %q, retry_after %v, retry_at %q (%v from now), message %q; want a retry a second away",
			r.Header.Get("Retry-After"), r.Header.Get("X-RateLimit-Reset"), r.Error.RetryAfter, r.Error.RetryAt, at.Sub(clock()), r.Error.Message)
	}
}

// A quota used up through a busy instance, whose leases took its last
// calls moments ago, is refused at another instance with a retry in a
// second: spare calls in a lease come back within moments, and a caller
// told the month's end stopped for days with calls left. Once no lease
// can hold any, the refusal names the month's end.
func TestAQuotaRefusedWhileLeasesMayHoldCallsSaysRetryShortly(t *testing.T) {
	env := edgetest.New(t)
	busy, other := env.Start(t, edgetest.Options{}), env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_lease_quota", edge.Secret, schemas.Live)
	hundred := int64(100)
	env.SetPlan(t, "acct_lease_quota", "quota100", edge.Limits{RequestsPerSecond: 1000, Burst: 1000, MonthlyRequests: &hundred}, "https://example.test/up")
	var allowed atomic.Int64
	for round := 0; round < 10; round++ {
		var wg sync.WaitGroup
		for range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if r := edgetest.Do(t, "GET", busy.URL+"/v1/x", key, nil); r.Status == 200 {
					allowed.Add(1)
				}
			}()
		}
		wg.Wait()
	}
	if allowed.Load() != 100 {
		t.Fatalf("%d calls allowed under a quota of 100", allowed.Load())
	}
	r := edgetest.Do(t, "GET", other.URL+"/v1/x", key, nil)
	if r.Status != 429 || r.Error.Code != "quota_exceeded" || r.Header.Get("Retry-After") != "1" {
		t.Fatalf("a call just after leases used the quota up: %d %+v, Retry-After %q; want quota_exceeded, retry in 1 s",
			r.Status, r.Error, r.Header.Get("Retry-After"))
	}
	if at, err := time.Parse(time.RFC3339Nano, r.Error.RetryAt); err != nil || time.Until(at) > 2*time.Second {
		t.Fatalf("retry_at %q, want within a second or so", r.Error.RetryAt)
	}
	time.Sleep(1100 * time.Millisecond)
	r = edgetest.Do(t, "GET", other.URL+"/v1/x", key, nil)
	ra, _ := strconv.ParseInt(r.Header.Get("Retry-After"), 10, 64)
	if r.Status != 429 || r.Error.Code != "quota_exceeded" || ra < 2 {
		t.Fatalf("a call a second after the last lease: %d %+v, Retry-After %q; want quota_exceeded until the month's end",
			r.Status, r.Error, r.Header.Get("Retry-After"))
	}
}

func TestMonthlyQuotaExhaustion(t *testing.T) {
	env := edgetest.New(t)
	clock := quotaClock(time.Now())
	in := env.Start(t, edgetest.Options{Now: clock})
	key, _ := env.Key(t, "acct_quota", edge.Secret, schemas.Live)
	testKey, _ := env.Key(t, "acct_quota", edge.Secret, schemas.Test)
	three := int64(3)
	env.SetPlan(t, "acct_quota", "quota3", edge.Limits{RequestsPerSecond: 100, Burst: 100, MonthlyRequests: &three}, "https://example.test/up")
	for i := 0; i < 3; i++ {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		if r.Status != 200 {
			t.Fatalf("call %d: %d", i, r.Status)
		}
		// The quota is tighter than the burst of 100: the headers speak
		// of the quota.
		left := strconv.Itoa(2 - i)
		if r.Header.Get("X-RateLimit-Limit") != "3" || r.Header.Get("X-RateLimit-Remaining") != left ||
			!strings.HasPrefix(r.Header.Get("RateLimit"), `"monthly";r=`+left+`;t=`) {
			t.Errorf("call %d: X-RateLimit-Limit %q, -Remaining %q, RateLimit %q; want the quota's 3 and %s left", i,
				r.Header.Get("X-RateLimit-Limit"), r.Header.Get("X-RateLimit-Remaining"), r.Header.Get("RateLimit"), left)
		}
	}
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
	if r.Header.Get("X-RateLimit-Remaining") != "0" || !strings.HasPrefix(r.Header.Get("RateLimit"), `"monthly";r=0;t=`) ||
		r.Header.Get("X-RateLimit-Reset") != r.Header.Get("Retry-After") {
		t.Errorf("refused call: X-RateLimit-Remaining %q, RateLimit %q, X-RateLimit-Reset %q, Retry-After %q; want 0 left until the month ends",
			r.Header.Get("X-RateLimit-Remaining"), r.Header.Get("RateLimit"), r.Header.Get("X-RateLimit-Reset"), r.Header.Get("Retry-After"))
	}
	now := clock().UTC()
	monthEnd := time.Date(now.Year(), now.Month()+1, 1, 0, 0, 0, 0, time.UTC)
	if r.Status != 429 || r.Error.Code != "quota_exceeded" || r.Error.Limit != "monthly" || r.Error.UpgradeURL != "https://example.test/up" {
		t.Fatalf("4th call: %d %+v", r.Status, r.Error)
	}
	if r.Error.RetryAt != monthEnd.Format(time.RFC3339) {
		t.Fatalf("retry_at %q, want %s", r.Error.RetryAt, monthEnd.Format(time.RFC3339))
	}
	ra, _ := strconv.ParseInt(r.Header.Get("Retry-After"), 10, 64)
	if d := monthEnd.Sub(clock()).Seconds() - float64(ra); d < -2 || d > 2 {
		t.Fatalf("Retry-After %d s, want about %.0f s", ra, monthEnd.Sub(clock()).Seconds())
	}
	if !strings.Contains(r.Header.Get("RateLimit-Policy"), `"monthly";q=3;w=`) {
		t.Fatalf("RateLimit-Policy %q has no monthly policy", r.Header.Get("RateLimit-Policy"))
	}
	if env.Live.Calls() != 3 {
		t.Fatalf("upstream served %d calls, want 3", env.Live.Calls())
	}
	// Test mode has its own allowance, so sandbox traffic never eats live quota.
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", testKey, nil); r.Status != 200 {
		t.Fatalf("test-mode call after live quota ran out: %d", r.Status)
	}
}

// A plans-table row that leaves out some limits takes them from edge.plans
// for its own plan, not from the free plan: a row with only a monthly quota
// gets the configured rate and burst and keeps its quota, and a row with no
// limits at all gets the configured plan whole. A row written by hand with a
// negative quota (which the invoicer refuses) has no quota: before, every
// answer's headers said that no call was left this month.
func TestPlanRowWithoutRateLimitsTakesTheConfiguredPlans(t *testing.T) {
	env := edgetest.New(t)
	million, negative := int64(1_000_000), int64(-1)
	in := env.Start(t, edgetest.Options{Config: func(c *edge.Config) {
		c.Plans = map[string]edge.Plan{
			"big":  {ID: "big", Limits: edge.Limits{RequestsPerSecond: 500, Burst: 1000}},
			"big2": {ID: "big2", Limits: edge.Limits{RequestsPerSecond: 500, Burst: 1000}},
			"big3": {ID: "big3", Limits: edge.Limits{RequestsPerSecond: 500, Burst: 1000}},
		}
	}})
	for _, c := range []struct {
		name, account, plan string
		row                 edge.Limits
		policy              string
	}{
		{"a row with only a quota keeps it", "acct_big_quota", "big", edge.Limits{MonthlyRequests: &million}, `"key";q=1000;w=2, "account";q=1000;w=2, "monthly";q=1000000;`},
		{"a row with no limits takes the configured plan", "acct_big_none", "big2", edge.Limits{}, `"key";q=1000;w=2, "account";q=1000;w=2`},
		{"a row with a negative quota has none", "acct_big_negative", "big3", edge.Limits{MonthlyRequests: &negative}, `"key";q=1000;w=2, "account";q=1000;w=2`},
	} {
		t.Run(c.name, func(t *testing.T) {
			key, _ := env.Key(t, c.account, edge.Secret, schemas.Live)
			env.SetPlan(t, c.account, c.plan, c.row, "")
			for i := range 20 { // twice the free plan's burst
				r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
				if r.Status != 200 {
					t.Fatalf("call %d: %d %+v", i, r.Status, r.Error)
				}
				quota := c.row.MonthlyRequests != nil && *c.row.MonthlyRequests >= 0
				if got := r.Header.Get("RateLimit-Policy"); i == 0 && !strings.HasPrefix(got, c.policy) || !quota && got != c.policy {
					t.Errorf("RateLimit-Policy %q, want %q", got, c.policy)
				}
				if got := r.Header.Get("X-RateLimit-Limit"); !quota && got != "1000" {
					t.Errorf("X-RateLimit-Limit %q, want the burst's 1000", got)
				}
			}
		})
	}
}

// serveUpstream serves h on a loopback port until the test ends and
// returns its base URL.
func serveUpstream(t *testing.T, h http.Handler) string {
	t.Helper()
	return serveServer(t, &http.Server{Handler: h})
}

// serveServer serves s on a loopback port until the test ends and returns
// its base URL.
func serveServer(t *testing.T, s *http.Server) string {
	t.Helper()
	ln := testListener(t)
	go func() { _ = s.Serve(ln) }()
	t.Cleanup(func() { _ = s.Close() })
	return "http://" + ln.Addr().String()
}

func testListener(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	return ln
}

// quotaClock is the edge's clock for a test that counts a monthly quota:
// the wall clock, moved off a UTC month boundary (the default
// quota_timezone) when the test starts within ten minutes of one. On the
// wall clock, calls in the last moments of a month are counted in two
// quota months, and the quota that should refuse them never runs out.
func quotaClock(start time.Time) func() time.Time {
	shift := testenv.MonthClockShift(start, time.UTC, 10*time.Minute)
	return func() time.Time { return time.Now().Add(shift) }
}

// /readyz is on the public listener too: when a dependency is down it says
// so without the cause, which may name internal hosts and users.
func TestReadyzDoesNotTellTheCause(t *testing.T) {
	env := edgetest.New(t)
	for _, netHTTP := range []bool{false, true} {
		in := env.Start(t, edgetest.Options{NetHTTP: netHTTP, Ready: func(context.Context) error {
			return fmt.Errorf("dial postgres://tollgate@10.1.2.3:5432/billing: connection refused")
		}})
		resp, err := http.Get(in.URL + "/readyz")
		testenv.Must(t, err, "GET /readyz")
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), `"not_ready"`) {
			t.Errorf("net/http %v: %d %s, want 503 not_ready", netHTTP, resp.StatusCode, b)
		}
		if strings.Contains(string(b), "10.1.2.3") || strings.Contains(string(b), "postgres") {
			t.Errorf("net/http %v: /readyz tells the cause: %s", netHTTP, b)
		}
	}
}

// A plan stored without an upgrade link, and not among edge.plans, still
// tells a refused caller where to buy more: the free tier's link, as its
// limits fall back to the free tier's. It gave none before.
// A subscription that ends, and one scheduled to follow it, change the
// account's plan with no notification: the edge looks the key up again
// when the change is due. Before, a cached key kept the old plan for up to
// the cache's TTL (30 s) after it.
func TestAScheduledPlanChangeReachesTheEdgeWhenItIsDue(t *testing.T) {
	env := edgetest.New(t)
	ctx := context.Background()
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_scheduled", edge.Secret, schemas.Live)
	for _, p := range []struct {
		id    string
		burst int
	}{{"sched_before", 100}, {"sched_after", 200}} {
		def, err := json.Marshal(map[string]any{"limits": edge.Limits{RequestsPerSecond: 100, Burst: p.burst}})
		testenv.Must(t, err, "plan json")
		_, err = env.PG.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition)
			VALUES ($1, 1, $1, 'usd', $2) ON CONFLICT DO NOTHING`, p.id, def)
		testenv.Must(t, err, "insert plan")
	}
	// sched_before for 2 s, then sched_after; each starts after the
	// account's first subscription, so is the one in force in its time.
	var dueIn float64 // seconds, by the database's clock
	err := env.PG.Pool.QueryRow(ctx, `
		WITH s AS (INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at, ends_at) VALUES
			($1, $3, 'sched_before', 1, now(), now() + interval '2 seconds'),
			($2, $3, 'sched_after', 1, now() + interval '2 seconds', NULL)
			RETURNING 1)
		SELECT extract(epoch FROM now() + interval '2 seconds' - clock_timestamp())::float8 FROM s LIMIT 1`,
		"sub_"+schemas.NewEventID().String(), "sub_"+schemas.NewEventID().String(), "acct_scheduled").Scan(&dueIn)
	testenv.Must(t, err, "insert the subscriptions")
	due := time.Now().Add(time.Duration(dueIn * float64(time.Second)))
	env.Settle(t) // the inserts' notifications have emptied the cache
	burst := func() string {
		r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
		if r.Status != 200 {
			t.Fatalf("call: %d %+v", r.Status, r.Error)
		}
		return r.Header.Get("X-Ratelimit-Limit")
	}
	if got := burst(); got != "100" || time.Now().After(due) {
		t.Fatalf("before the change: X-RateLimit-Limit %s; want 100 (and the call before %v)", got, due)
	}
	for {
		got := burst()
		now := time.Now()
		if got == "200" {
			if now.Before(due) {
				t.Fatalf("the new plan served %v before it starts", due.Sub(now))
			}
			t.Logf("the new plan served %v after it started", now.Sub(due).Round(time.Millisecond))
			break
		}
		if got != "100" {
			t.Fatalf("X-RateLimit-Limit %s; want 100, then 200", got)
		}
		if now.After(due.Add(3 * time.Second)) {
			t.Fatal("the old plan still served 3 s after the new one started")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A change to an account's time zone (which moves its quota months)
// reaches the edge's key cache at once, by notification, as a change to
// a subscription does. Before, the cache kept the old zone until its
// entry expired (30 s).
func TestAnAccountsTimeZoneChangeReachesTheCacheAtOnce(t *testing.T) {
	env := edgetest.New(t)
	ctx := context.Background()
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_zone_change", edge.Secret, schemas.Live)
	parsed, err := edge.ParseKey(key)
	testenv.Must(t, err, "parse the key")
	zone := func() string {
		k, err := in.Cache.KeyByHash(ctx, parsed.Hash)
		testenv.Must(t, err, "look the key up")
		return k.AccountTimezone
	}
	if got := zone(); got != "UTC" {
		t.Fatalf("zone %q before the change; want UTC", got)
	}
	_, err = env.PG.Pool.Exec(ctx, `UPDATE accounts SET timezone = 'Pacific/Auckland' WHERE id = $1`, "acct_zone_change")
	testenv.Must(t, err, "change the zone")
	env.Settle(t)
	if got := zone(); got != "Pacific/Auckland" {
		t.Fatalf("zone %q after the change; want Pacific/Auckland", got)
	}
}

func TestARefusalUnderAPlanWithoutALinkPointsToTheFreeTiers(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_nolink", edge.Secret, schemas.Live)
	one := int64(1)
	env.SetPlan(t, "acct_nolink", "bespoke", edge.Limits{RequestsPerSecond: 100, Burst: 100, MonthlyRequests: &one}, "")
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 200 {
		t.Fatalf("first call: %d", r.Status)
	}
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
	want := edge.DefaultPlans()["free"].UpgradeURL
	if r.Status != 429 || r.Error.Code != "quota_exceeded" || r.Error.UpgradeURL != want {
		t.Fatalf("second call: %d %+v; want quota_exceeded with upgrade_url %q", r.Status, r.Error, want)
	}
}

// A call by a valid key that its route or scopes refuse takes its token
// from the rate limits, as any call does: its answer carries their
// headers, and once they are spent it gets the 429. It costs no monthly
// quota, which counts only calls that reach the upstream. Both fronts.
func TestARefusedCallCarriesTheRateLimitHeadersAndCostsNoQuota(t *testing.T) {
	for _, netHTTP := range []bool{false, true} {
		t.Run(fmt.Sprintf("net/http=%v", netHTTP), func(t *testing.T) {
			env := edgetest.New(t)
			in := env.Start(t, edgetest.Options{Config: withRoutes, NetHTTP: netHTTP, Now: quotaClock(time.Now())})
			acct := "acct_refused_headers"
			readOnly, _ := env.Key(t, acct, edge.Secret, schemas.Live, "widgets:read")
			one := int64(1)
			env.SetPlan(t, acct, "one_a_month", edge.Limits{RequestsPerSecond: 1, Burst: 4, MonthlyRequests: &one}, "https://example.test/up")
			calls := []struct {
				method, path string
				status       int
				code         string
				monthly      bool // the answer names the monthly quota
			}{
				{"DELETE", "/v1/widgets/1", 403, "insufficient_scope", false},
				{"GET", "/v1/secrets", 404, "route_not_found", false},
				// The quota of one is still whole: the refusals cost none of it.
				{"GET", "/v1/widgets/1", 200, "", true},
				// A method no route names, which net/http's router would
				// answer itself, before the key is read.
				{"FOO", "/v1/widgets/1", 405, "method_not_allowed", false},
				// The burst of four is spent.
				{"DELETE", "/v1/widgets/1", 429, "rate_limited", false},
			}
			for i, c := range calls {
				r := edgetest.Do(t, c.method, in.URL+c.path, readOnly, nil)
				if r.Status != c.status || r.Error.Code != c.code {
					t.Fatalf("call %d, %s %s: %d %q, want %d %q (%s)", i+1, c.method, c.path, r.Status, r.Error.Code, c.status, c.code, r.Body)
				}
				h := r.Header
				if c.status == 405 && h.Get("Allow") != edge.AllowedMethods {
					t.Fatalf("call %d: a 405 with Allow %q, want %q", i+1, h.Get("Allow"), edge.AllowedMethods)
				}
				policy := h.Get("RateLimit-Policy")
				if h.Get("X-RateLimit-Limit") == "" || h.Get("X-RateLimit-Remaining") == "" || h.Get("X-RateLimit-Reset") == "" ||
					h.Get("RateLimit") == "" || !strings.HasPrefix(policy, `"key";q=4;w=4`) ||
					strings.Contains(policy, "monthly") != c.monthly {
					t.Fatalf("call %d (%d): X-RateLimit-Limit %q, -Remaining %q, -Reset %q, RateLimit %q, RateLimit-Policy %q",
						i+1, r.Status, h.Get("X-RateLimit-Limit"), h.Get("X-RateLimit-Remaining"), h.Get("X-RateLimit-Reset"), h.Get("RateLimit"), policy)
				}
				if !c.monthly {
					// The tightest bucket: four tokens, one taken per call.
					if want := strconv.Itoa(max(0, 4-(i+1))); h.Get("X-RateLimit-Limit") != "4" || h.Get("X-RateLimit-Remaining") != want {
						t.Fatalf("call %d: X-RateLimit-Limit %q, -Remaining %q, want 4 and %s", i+1, h.Get("X-RateLimit-Limit"), h.Get("X-RateLimit-Remaining"), want)
					}
				}
			}
		})
	}
}

// Of two subscriptions that start at the same moment, the one created
// later is in force at the edge, as on the invoice (the fix the invoicer's
// docs give for a refused plan version). Before, the edge's pick between
// them was whichever the database returned first.
func TestTheLaterOfTwoSubscriptionsStartingTogetherIsInForce(t *testing.T) {
	env := edgetest.New(t)
	ctx := context.Background()
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_tie", edge.Secret, schemas.Live)
	for _, p := range []struct {
		id    string
		burst int
	}{{"tie_first", 100}, {"tie_later", 200}} {
		def, err := json.Marshal(map[string]any{"limits": edge.Limits{RequestsPerSecond: 100, Burst: p.burst}})
		testenv.Must(t, err, "plan json")
		_, err = env.PG.Pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition)
			VALUES ($1, 1, $1, 'usd', $2) ON CONFLICT DO NOTHING`, p.id, def)
		testenv.Must(t, err, "insert plan")
	}
	// Both after the account's first subscription (the key's); the
	// later-created row first in the table, so that an unordered pick
	// would likely find the earlier one.
	_, err := env.PG.Pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at, created_at) VALUES
		('sub_tie_b', 'acct_tie', 'tie_later', 1, now(), now()),
		('sub_tie_a', 'acct_tie', 'tie_first', 1, now(), now() - interval '1 second')`)
	testenv.Must(t, err, "insert the subscriptions")
	env.Settle(t)
	r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil)
	if r.Status != 200 || r.Header.Get("X-Ratelimit-Limit") != "200" {
		t.Fatalf("call: %d, X-RateLimit-Limit %s; want 200, tie_later's burst", r.Status, r.Header.Get("X-Ratelimit-Limit"))
	}
}
