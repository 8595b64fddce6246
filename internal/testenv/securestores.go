package testenv

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// TLSServer is a private Redis or ClickHouse server that also serves
// clients over TLS, with a certificate for 127.0.0.1 and localhost from a
// CA made for the test only: a client trusts it only through CAFile or
// CAPEM. Its Instance stops, starts and kills it as for PrivateRedis and
// PrivateClickHouse.
type TLSServer struct {
	*Instance
	// Addr is host:port of the TLS listener (for ClickHouse, the secure
	// native-protocol port). It shadows Instance.Addr, which is PlainAddr.
	Addr string
	// PlainAddr is host:port of the listener without TLS, which the
	// server keeps (for ClickHouse, the plain native-protocol port).
	PlainAddr string
	// CAFile is the PEM file of the CA certificate that signed the server's.
	CAFile string
	// CAPEM is CAFile's contents.
	CAPEM []byte
	// ClientCertFile and ClientKeyFile are PEM files of a client
	// certificate the same CA signed, and its key.
	ClientCertFile, ClientKeyFile string
}

// PrivateTLSRedis starts a Redis server for this test with a TLS port
// beside its plain one. Redis does not ask clients for certificates.
func PrivateTLSRedis(t testing.TB) *TLSServer {
	t.Helper()
	return privateTLSRedis(t, "no")
}

// PrivateMutualTLSRedis is PrivateTLSRedis with a TLS port that takes only
// clients with a certificate its CA signed (Redis's tls-auth-clients yes),
// such as the TLSServer's ClientCertFile.
func PrivateMutualTLSRedis(t testing.TB) *TLSServer {
	t.Helper()
	return privateTLSRedis(t, "yes")
}

func privateTLSRedis(t testing.TB, authClients string) *TLSServer {
	t.Helper()
	files := writeServerCertificates(t, "private TLS redis")
	ports := freePorts(t, 2)
	plain, tlsPort := "127.0.0.1:"+strconv.Itoa(ports[0]), ports[1]
	inst := startInstance(t, "redis", plain,
		"TOLLGATE_REDIS_ADDR="+plain,
		"TOLLGATE_REDIS_TLS_PORT="+strconv.Itoa(tlsPort),
		"TOLLGATE_REDIS_TLS_CERT="+files.cert,
		"TOLLGATE_REDIS_TLS_KEY="+files.key,
		"TOLLGATE_REDIS_TLS_CA="+files.ca,
		"TOLLGATE_REDIS_TLS_AUTH_CLIENTS="+authClients)
	return files.server(t, inst, tlsPort)
}

// PrivateTLSClickHouse starts a ClickHouse server for this test with a
// secure native-protocol port beside its plain native and HTTP ports.
// ClickHouse does not ask clients for certificates.
func PrivateTLSClickHouse(t testing.TB) *TLSServer {
	t.Helper()
	files := writeServerCertificates(t, "private TLS clickhouse")
	ports := freePorts(t, 3)
	plain, httpPort, tlsPort := "127.0.0.1:"+strconv.Itoa(ports[0]), ports[1], ports[2]
	inst := startInstance(t, "clickhouse", plain,
		"TOLLGATE_CLICKHOUSE_ADDR="+plain,
		"TOLLGATE_CLICKHOUSE_HTTP_PORT="+strconv.Itoa(httpPort),
		"TOLLGATE_CLICKHOUSE_TLS_PORT="+strconv.Itoa(tlsPort),
		"TOLLGATE_CLICKHOUSE_TLS_CERT="+files.cert,
		"TOLLGATE_CLICKHOUSE_TLS_KEY="+files.key)
	return files.server(t, inst, tlsPort)
}

// serverFiles are the PEM files of a TLS server's CA, certificate and key.
type serverFiles struct {
	ca, cert, key         string
	clientCert, clientKey string
	caPEM                 []byte
}

// writeServerCertificates makes a CA and a server certificate for
// 127.0.0.1 and localhost, and writes them under the test's temporary
// directory; what names the server in messages.
func writeServerCertificates(t testing.TB, what string) serverFiles {
	t.Helper()
	c := testCertificates(t, "127.0.0.1", "localhost")
	dir := t.TempDir()
	f := serverFiles{
		ca:         filepath.Join(dir, "ca.pem"),
		cert:       filepath.Join(dir, "server.pem"),
		key:        filepath.Join(dir, "server-key.pem"),
		clientCert: filepath.Join(dir, "client.pem"),
		clientKey:  filepath.Join(dir, "client-key.pem"),
		caPEM:      c.ca,
	}
	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{f.ca, c.ca, 0o644},
		{f.cert, c.serverCert, 0o644},
		// The private keys, unencrypted: readable by their owner only.
		{f.key, c.serverKey, 0o600},
		{f.clientCert, c.clientCert, 0o644},
		{f.clientKey, c.clientKey, 0o600},
	} {
		if err := os.WriteFile(w.path, w.data, w.mode); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	return f
}

// server is the TLSServer of inst, whose TLS listener is on tlsPort. A
// failed test shows the ends of the server's logs first.
func (f serverFiles) server(t testing.TB, inst *Instance, tlsPort int) *TLSServer {
	t.Helper()
	// Cleanups run last first: this one runs before the instance is
	// stopped and its state, logs included, removed.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("private %s logs:\n%s", inst.Service, inst.serverLogTails(60))
		}
	})
	return &TLSServer{
		Instance:       inst,
		Addr:           "127.0.0.1:" + strconv.Itoa(tlsPort),
		PlainAddr:      inst.Addr,
		CAFile:         f.ca,
		CAPEM:          f.caPEM,
		ClientCertFile: f.clientCert,
		ClientKeyFile:  f.clientKey,
	}
}

// serverLogTails is logTails with, for ClickHouse, the server's own logs,
// which it writes in its data directory (where a TLS error shows), not in
// the state directory's logs.
func (i *Instance) serverLogTails(n int) string {
	tails := i.logTails(n)
	if i.Service != "clickhouse" {
		return tails
	}
	logs, _ := filepath.Glob(filepath.Join(i.stateDir(), "clickhouse", "log", "*.log"))
	return tails + tailFiles(logs, n)
}

// freePorts is n different free ports for one server: freePort picks at
// random, and may pick a port twice.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	for len(ports) < n {
		if p := freePort(t); !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	return ports
}
