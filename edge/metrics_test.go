package edge_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestMetricsEndpointCountsEveryOutcomeExactly sends a known mix of calls
// (served, refused for each authentication reason, refused by the monthly
// quota) to a real edge and reads /metrics from the admin listener, wired
// to the edge's registry as `tollgate edge` wires it: every counter shows
// exactly those calls, and nothing else.
func TestMetricsEndpointCountsEveryOutcomeExactly(t *testing.T) {
	env := edgetest.New(t)
	// The quota calls below must fall in one quota month.
	in := env.Start(t, edgetest.Options{Now: quotaClock(time.Now())})
	sum := sha256.Sum256([]byte(adminToken))
	admin, err := edge.NewAdmin(hex.EncodeToString(sum[:]), edge.AdminDeps{Store: env.Store, Gatherer: in.Registry})
	testenv.Must(t, err, "new admin")
	adminSrv := httptest.NewServer(admin)
	t.Cleanup(adminSrv.Close)

	key, _ := env.Key(t, "acct_metrics", edge.Secret, schemas.Live)
	revoked, revokedID := env.Key(t, "acct_metrics", edge.Secret, schemas.Live)
	_, err = env.Store.RevokeKey(context.Background(), revokedID, time.Now(), edge.AuditInfo{Actor: "test"})
	testenv.Must(t, err, "revoke key")
	four := int64(4)
	env.SetPlan(t, "acct_metrics", "quota4", edge.Limits{RequestsPerSecond: 1000, Burst: 1000, MonthlyRequests: &four}, "")
	unknown, _, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate unknown key")

	calls := []struct {
		what, key string
		status    int
	}{
		{"served 1", key, 200},
		{"missing key 1", "", 401},
		{"served 2", key, 200},
		{"malformed key", "sk_live_garbage", 401},
		{"served 3", key, 200},
		{"unknown key", unknown, 401},
		{"served 4", key, 200},
		{"quota used up 1", key, 429},
		{"revoked key", revoked, 401},
		{"quota used up 2", key, 429},
		{"missing key 2", "", 401},
		{"quota used up 3", key, 429},
	}
	for _, c := range calls {
		r := edgetest.Do(t, "GET", in.URL+"/v1/things", c.key, nil)
		if r.Status != c.status {
			t.Fatalf("%s: status %d, want %d: %s", c.what, r.Status, c.status, r.Body)
		}
		if c.status == 429 && r.Error.Code != "quota_exceeded" {
			t.Fatalf("%s: error %q, want quota_exceeded", c.what, r.Error.Code)
		}
	}

	want := map[string]string{
		`tollgate_edge_responses_total{code="200"}`:                             "4",
		`tollgate_edge_responses_total{code="401"}`:                             "5",
		`tollgate_edge_responses_total{code="429"}`:                             "3",
		`tollgate_edge_auth_failures_total{reason="malformed"}`:                 "1",
		`tollgate_edge_auth_failures_total{reason="missing"}`:                   "2",
		`tollgate_edge_auth_failures_total{reason="revoked"}`:                   "1",
		`tollgate_edge_auth_failures_total{reason="unknown"}`:                   "1",
		`tollgate_edge_limited_total{limit="monthly"}`:                          "3",
		`tollgate_edge_request_duration_seconds_count{route="*"}`:               "7",
		`tollgate_edge_request_duration_seconds_count{route="unauthenticated"}`: "5",
	}
	// Every series of these families, so that a count under a label that
	// should not exist fails too. Each call is timed once: authenticated
	// calls under the open router's route label "*", refused
	// authentications under "unauthenticated".
	families := []string{"tollgate_edge_responses_total{", "tollgate_edge_auth_failures_total{",
		"tollgate_edge_limited_total{", "tollgate_edge_request_duration_seconds_count{"}
	url := adminSrv.URL + "/metrics"
	var got map[string]string
	// The edge counts a response after its handler returns, which can be
	// just after the client has read it; wait briefly for the last count.
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = map[string]string{}
		for series, v := range scrapeSamples(t, url) {
			for _, f := range families {
				if strings.HasPrefix(series, f) {
					got[series] = v
				}
			}
		}
		if maps.Equal(got, want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for series, v := range want {
		if got[series] != v {
			t.Errorf("%s = %q, want %s", series, got[series], v)
		}
	}
	for series, v := range got {
		if _, ok := want[series]; !ok {
			t.Errorf("unexpected series %s = %s", series, v)
		}
	}
}

// scrapeSamples reads a text exposition into series name (with labels) ->
// value.
func scrapeSamples(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url)
	testenv.Must(t, err, "GET "+url)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		out[line[:i]] = line[i+1:]
	}
	testenv.Must(t, sc.Err(), "read "+url)
	return out
}
