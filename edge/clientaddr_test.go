package edge_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

func TestClientAddr(t *testing.T) {
	lb, err := edge.ParseTrustedProxies("t", []string{"10.0.0.0/8", "127.0.0.1", "::1", "::ffff:192.168.1.0/120"})
	testenv.Must(t, err, "parse")
	for _, c := range []struct {
		name      string
		trusted   edge.TrustedProxies
		peer      string
		forwarded []string
		want      string
	}{
		{"without trusted proxies the peer is the caller, whatever the header says", nil, "10.1.2.3:5000", []string{"203.0.113.9"}, "10.1.2.3"},
		{"an untrusted peer is the caller", lb, "198.51.100.7:5000", []string{"203.0.113.9"}, "198.51.100.7"},
		{"a trusted peer forwards for the caller", lb, "10.1.2.3:5000", []string{"203.0.113.9"}, "203.0.113.9"},
		{"entries left of the first untrusted one are the caller's to write", lb, "10.1.2.3:5000", []string{"6.6.6.6, 203.0.113.9"}, "203.0.113.9"},
		{"trusted hops are passed over, from the right", lb, "127.0.0.1:5000", []string{"203.0.113.9, 10.9.9.9", "10.0.0.1"}, "203.0.113.9"},
		{"a trusted peer with no header is the caller", lb, "10.1.2.3:5000", nil, "10.1.2.3"},
		{"only trusted hops: the leftmost", lb, "10.1.2.3:5000", []string{"10.0.0.7, 10.0.0.8"}, "10.0.0.7"},
		{"an entry that is no address stops at the last trusted hop", lb, "10.1.2.3:5000", []string{"203.0.113.9, unknown, 10.0.0.8"}, "10.0.0.8"},
		{"entries with ports and brackets", lb, "[::1]:5000", []string{"[2001:db8::1]:443, 10.0.0.5:80"}, "2001:db8::1"},
		{"an IPv4-mapped peer is its IPv4 address", lb, "[::ffff:192.168.1.20]:5000", []string{"203.0.113.9"}, "203.0.113.9"},
		{"empty entries are passed over", lb, "10.1.2.3:5000", []string{"203.0.113.9,, "}, "203.0.113.9"},
		{"a peer without a port", lb, "10.1.2.3", []string{"203.0.113.9"}, "203.0.113.9"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := c.trusted.ClientAddr(c.peer, c.forwarded); got != c.want {
				t.Fatalf("ClientAddr(%q, %q) = %q, want %q", c.peer, c.forwarded, got, c.want)
			}
		})
	}
	t.Run("what is neither an address nor a range is refused, by name", func(t *testing.T) {
		_, err := edge.ParseTrustedProxies("edge.trusted_proxies", []string{"10.0.0.0/8", "lb.internal", "10.0.0.0/33"})
		if err == nil || !contains([]string{err.Error()}, `edge.trusted_proxies: "lb.internal" is neither an IP address nor a CIDR range (such as 10.0.0.0/8)`+"\n"+
			`edge.trusted_proxies: "10.0.0.0/33" is neither an IP address nor a CIDR range (such as 10.0.0.0/8)`) {
			t.Fatalf("err = %v", err)
		}
	})
}

// TestTheAuditLogNamesTheCallerBehindATrustedProxy: behind a load balancer
// (edge.trusted_proxies), a failed authentication's audit row names the
// caller the balancer forwarded for, on both fronts; without one, and on the
// admin API (which trusts no proxy: a caller in a trusted range could write
// the address its key actions are recorded under), the address the
// connection came from.
func TestTheAuditLogNamesTheCallerBehindATrustedProxy(t *testing.T) {
	env := edgetest.New(t)
	trust := func(c *edge.Config) { c.TrustedProxies = []string{"127.0.0.0/8", "::1"} }
	fast := env.Start(t, edgetest.Options{Config: trust})
	netHTTP := env.Start(t, edgetest.Options{Config: trust, NetHTTP: true})
	untrusting := env.Start(t, edgetest.Options{})
	unknown := "sk_live_" + "0000000000000000000000000000"
	call := func(url, forwardedFor string) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+unknown)
		req.Header.Set("X-Forwarded-For", forwardedFor)
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "call")
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("GET %s: %d, want 401", url, resp.StatusCode)
		}
	}
	call(fast.URL+"/v1/widgets", "6.6.6.6, 203.0.113.1")
	call(netHTTP.URL+"/v1/widgets", "6.6.6.6, 203.0.113.2")
	call(fast.URL+"/v1/events", "6.6.6.6, 203.0.113.3") // the fasthttp front's slow path
	call(untrusting.URL+"/v1/widgets", "203.0.113.4")
	sum := sha256.Sum256([]byte(adminToken))
	admin, err := edge.NewAdmin(hex.EncodeToString(sum[:]), edge.AdminDeps{Store: env.Store, Auditor: fast.Audit})
	testenv.Must(t, err, "new admin")
	adminSrv := httptest.NewServer(admin)
	defer adminSrv.Close()
	req, _ := http.NewRequest(http.MethodGet, adminSrv.URL+"/admin/v1/keys/key_x", nil)
	req.Header.Set("Authorization", "Bearer wrong")
	req.Header.Set("X-Forwarded-For", "203.0.113.5")
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "admin call")
	resp.Body.Close()

	for _, in := range []*edgetest.Instance{fast, netHTTP, untrusting} {
		in.Audit.Flush(context.Background())
	}
	rows, err := env.PG.Pool.Query(context.Background(), `SELECT action, remote_addr FROM audit_log ORDER BY remote_addr`)
	testenv.Must(t, err, "audit rows")
	got := map[string]bool{}
	for rows.Next() {
		var action, remote string
		testenv.Must(t, rows.Scan(&action, &remote), "scan")
		got[action+" from "+remote] = true
	}
	for _, want := range []string{
		edge.ActionAuthFailed + " from 203.0.113.1", edge.ActionAuthFailed + " from 203.0.113.2", edge.ActionAuthFailed + " from 203.0.113.3",
		edge.ActionAuthFailed + " from 127.0.0.1", edge.ActionAdminAuth + " from 127.0.0.1",
	} {
		if !got[want] {
			t.Errorf("no row %s; rows: %v", want, got)
		}
	}
	for row := range got {
		for _, spoofed := range []string{"6.6.6.6", "203.0.113.4", "203.0.113.5"} {
			if strings.HasSuffix(row, " "+spoofed) {
				t.Errorf("row %s names an address only the caller wrote", row)
			}
		}
	}
}

func TestUpgradeAsked(t *testing.T) {
	for _, c := range []struct {
		asked, got string
		want       bool
	}{
		{"websocket", "websocket", true},
		{"websocket", "WebSocket", true},
		{"echo, websocket", "websocket", true},
		{"websocket/13", "websocket", true},
		{"websocket", "websocket/13", true},
		{"websocket/13", "websocket/8", false},
		{"echo", "h2c", false},
		{"websocket", "", false},
		{"", "websocket", false},
		{"websocket", "websocket/13, h2c", false},
		{"websocket", "websocket/x h2c", false},
		{"echo", "echo/1,h2c", false},
		{"websocket", "websocket/", false},
	} {
		if got := edge.UpgradeAsked(c.asked, c.got); got != c.want {
			t.Errorf("UpgradeAsked(%q, %q) = %v, want %v", c.asked, c.got, got, c.want)
		}
	}
}
