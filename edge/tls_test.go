package edge_test

import (
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestHTTPSUpstream proxies to an https upstream whose certificate an
// internal CA signed, on both fronts: trusted through upstream_ca_file, a
// call and an upgraded connection pass; without it, the certificate is
// refused and the caller gets 502.
func TestHTTPSUpstream(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_tls", edge.Secret, schemas.Live)
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/plain", func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			http.Error(w, "not over TLS", 500)
			return
		}
		_, _ = io.WriteString(w, "over TLS")
	})
	mux.Handle("/v1/socket", upgradeEcho)
	up := httptest.NewUnstartedServer(mux)
	up.EnableHTTP2 = false
	up.StartTLS()
	t.Cleanup(up.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	testenv.Must(t, os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw}), 0o600), "write the CA")

	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				c.Upstream, c.UpstreamCAFile = up.URL, ca
			}})
			if r := edgetest.Do(t, "GET", in.URL+"/v1/plain", key, nil); r.Status != 200 || string(r.Body) != "over TLS" {
				t.Fatalf("status %d body %q", r.Status, r.Body)
			}
			conn, br, resp := openEcho(t, in, key, "ping\n")
			if resp.StatusCode != 101 {
				t.Fatalf("upgrade: status %d", resp.StatusCode)
			}
			if got, err := br.ReadString('\n'); err != nil || got != "echo: ping\n" {
				t.Fatalf("upgraded connection: got %q, %v", got, err)
			}
			conn.Close()

			untrusting := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) { c.Upstream = up.URL }})
			if r := edgetest.Do(t, "GET", untrusting.URL+"/v1/plain", key, nil); r.Status != 502 || r.Error.Code != "upstream_unavailable" {
				t.Fatalf("without the CA: status %d error %+v", r.Status, r.Error)
			}
		})
	}
}
