package edge_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/demo"
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
	up, ca := tlsUpstream(t, mux, nil)

	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				c.Upstream, c.UpstreamCAFile = up.URL, ca
			}})
			if r := edgetest.Do(t, "GET", in.URL+"/v1/plain", key, nil); r.Status != 200 || string(r.Body) != "over TLS" {
				t.Fatalf("status %d body %q", r.Status, r.Body)
			}
			conn, _, _ := echoed(t, in, key, "ping\n")
			conn.Close()

			untrusting := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) { c.Upstream = up.URL }})
			if r := edgetest.Do(t, "GET", untrusting.URL+"/v1/plain", key, nil); r.Status != 502 || r.Error.Code != "upstream_unavailable" {
				t.Fatalf("without the CA: status %d error %+v", r.Status, r.Error)
			}
		})
	}
}

// TestServingHTTPS runs the front with tls_cert_file and tls_key_file: a
// caller trusting the certificate gets its call proxied, the upstream
// learns it came over HTTPS, and a plain-HTTP caller gets no answer.
func TestServingHTTPS(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_https", edge.Secret, schemas.Live)
	certFile, keyFile, roots := selfSigned(t)
	in := env.Start(t, edgetest.Options{Config: func(c *edge.Config) { c.TLSCertFile, c.TLSKeyFile = certFile, keyFile }})
	if !strings.HasPrefix(in.URL, "https://") {
		t.Fatalf("edge URL %s", in.URL)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}, Timeout: 10 * time.Second}
	req, _ := http.NewRequest("GET", in.URL+"/v1/things/1", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := client.Do(req)
	testenv.Must(t, err, "call over HTTPS")
	var echo demo.Echo
	testenv.Must(t, json.NewDecoder(resp.Body).Decode(&echo), "decode")
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil || echo.Path != "/v1/things/1" {
		t.Fatalf("status %d, TLS %v, upstream saw %+v", resp.StatusCode, resp.TLS != nil, echo)
	}
	if got := echo.Headers["X-Forwarded-Proto"]; len(got) != 1 || got[0] != "https" {
		t.Fatalf("X-Forwarded-Proto %v, want https", got)
	}
	if _, err := http.Get("http://" + strings.TrimPrefix(in.URL, "https://") + "/v1/things/1"); err == nil {
		t.Fatal("a plain-HTTP call to the HTTPS edge got an HTTP answer")
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// their files and a pool that trusts the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	testenv.Must(t, err, "generate a key")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "edge.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	testenv.Must(t, err, "create a certificate")
	keyDER, err := x509.MarshalECPrivateKey(priv)
	testenv.Must(t, err, "encode the key")
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	testenv.Must(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600), "write the certificate")
	testenv.Must(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600), "write the key")
	cert, err := x509.ParseCertificate(der)
	testenv.Must(t, err, "parse the certificate")
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return certFile, keyFile, roots
}

// TestMutualTLSUpstream proxies to an https upstream that requires a client
// certificate its own CA signed, on both fronts: an edge with
// upstream_client_cert_file and upstream_client_key_file gets a call and an
// upgraded connection through; one without is refused by the upstream and
// answers 502; one with only the certificate is refused at start.
func TestMutualTLSUpstream(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_mtls", edge.Secret, schemas.Live)
	// The edge's client certificate, self-signed: the upstream's CA.
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	testenv.Must(t, err, "generate a key")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "tollgate-edge"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	testenv.Must(t, err, "create the client certificate")
	keyDER, err := x509.MarshalECPrivateKey(priv)
	testenv.Must(t, err, "encode the key")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	testenv.Must(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600), "write the certificate")
	testenv.Must(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600), "write the key")
	clientCert, err := x509.ParseCertificate(der)
	testenv.Must(t, err, "parse the certificate")
	clients := x509.NewCertPool()
	clients.AddCert(clientCert)

	mux := http.NewServeMux()
	mux.HandleFunc("/v1/plain", func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "no client certificate", 500)
			return
		}
		_, _ = io.WriteString(w, "from "+r.TLS.PeerCertificates[0].Subject.CommonName)
	})
	up, ca := tlsUpstream(t, mux, &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: clients})

	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				c.Upstream, c.UpstreamCAFile, c.UpstreamClientCertFile, c.UpstreamClientKeyFile = up.URL, ca, certFile, keyFile
			}})
			if r := edgetest.Do(t, "GET", in.URL+"/v1/plain", key, nil); r.Status != 200 || string(r.Body) != "from tollgate-edge" {
				t.Fatalf("with the client certificate: status %d body %q", r.Status, r.Body)
			}
			conn, _, _ := echoed(t, in, key, "ping\n")
			conn.Close()

			anonymous := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) { c.Upstream, c.UpstreamCAFile = up.URL, ca }})
			if r := edgetest.Do(t, "GET", anonymous.URL+"/v1/plain", key, nil); r.Status != 502 || r.Error.Code != "upstream_unavailable" {
				t.Fatalf("without a client certificate: status %d error %+v", r.Status, r.Error)
			}
		})
	}
	half := edge.Config{Listen: "127.0.0.1:0", Upstream: up.URL, UpstreamClientCertFile: certFile}
	half.Defaults()
	if err := half.Validate(); err == nil || !strings.Contains(err.Error(), "set both or neither") {
		t.Fatalf("a client certificate without its key: %v, want it refused", err)
	}
}

// tlsUpstream serves mux, with /v1/socket the upgrading echo, over HTTPS
// (HTTP/1.1, cfg's settings when not nil) with a certificate of its own,
// and returns it with the path of a PEM file of that certificate, the CA
// an edge trusts it by (upstream_ca_file).
func tlsUpstream(t *testing.T, mux *http.ServeMux, cfg *tls.Config) (*httptest.Server, string) {
	t.Helper()
	mux.Handle("/v1/socket", upgradeEcho)
	up := httptest.NewUnstartedServer(mux)
	up.EnableHTTP2 = false
	up.TLS = cfg
	up.StartTLS()
	t.Cleanup(up.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	testenv.Must(t, os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw}), 0o600), "write the CA")
	return up, ca
}
