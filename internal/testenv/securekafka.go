package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// SecureKafka is a private Kafka broker that also serves clients over
// SASL_SSL: TLS with a certificate from a CA made for the test, and SASL
// PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for one user. Its Instance stops,
// starts and kills it as for PrivateKafka.
type SecureKafka struct {
	*Instance
	// Addr is host:port of the SASL_SSL listener. It shadows Instance.Addr,
	// which is PlainAddr.
	Addr string
	// PlainAddr is host:port of the PLAINTEXT listener, which needs no
	// credentials (for setting up topics the plain way).
	PlainAddr string
	// CAFile is the PEM file of the CA certificate that signed the broker's.
	CAFile string
	// CAPEM is CAFile's contents.
	CAPEM []byte
	// User and Password log in with any of the three mechanisms. The
	// password is random for each test.
	User, Password string
	// ClientCertFile and ClientKeyFile are PEM files of a client
	// certificate the CA signed, and its key: what a broker made by
	// PrivateMutualTLSKafka asks every SASL_SSL client for.
	ClientCertFile, ClientKeyFile string
}

// PrivateSecureKafka starts a single-node Kafka broker for this test with
// a SASL_SSL listener beside its PLAINTEXT one. Its certificate is for
// 127.0.0.1 and localhost, signed by a CA made for this test only, so a
// client trusts it only through CAFile or CAPEM.
func PrivateSecureKafka(t testing.TB) *SecureKafka {
	t.Helper()
	return privateSecureKafka(t, false)
}

// PrivateMutualTLSKafka is PrivateSecureKafka with a SASL_SSL listener
// that also asks every client for a certificate its CA signed
// (ssl.client.auth=required), such as ClientCertFile.
func PrivateMutualTLSKafka(t testing.TB) *SecureKafka {
	t.Helper()
	return privateSecureKafka(t, true)
}

func privateSecureKafka(t testing.TB, clientAuth bool) *SecureKafka {
	t.Helper()
	dir := t.TempDir()
	c := testCertificates(t, "127.0.0.1", "localhost")
	// A PEM key store as Kafka reads one: the broker's private key, then
	// its certificate chain.
	caPEM, keystore := c.ca, slices.Concat(c.serverKey, c.serverCert, c.ca)
	caFile := filepath.Join(dir, "ca.pem")
	keystoreFile := filepath.Join(dir, "broker-keystore.pem")
	clientCert, clientKey := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{caFile, caPEM, 0o644},
		// The private keys, unencrypted: readable by their owner only.
		{keystoreFile, keystore, 0o600},
		{clientCert, c.clientCert, 0o644},
		{clientKey, c.clientKey, 0o600},
	} {
		if err := os.WriteFile(w.path, w.data, w.mode); err != nil {
			t.Fatalf("private secure kafka: %v", err)
		}
	}
	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		t.Fatalf("private secure kafka: password: %v", err)
	}
	// Letters and digits only: services.sh writes the user and password
	// unquoted into a JAAS string and a SCRAM credential.
	user, password := "tollgate", hex.EncodeToString(secret)
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	_, port, _ := net.SplitHostPort(addr)
	env := []string{
		"TOLLGATE_KAFKA_SECURE_PORT=" + port,
		"TOLLGATE_KAFKA_TLS_KEYSTORE=" + keystoreFile,
		"TOLLGATE_KAFKA_SASL_USER=" + user,
		"TOLLGATE_KAFKA_SASL_PASSWORD=" + password,
	}
	if clientAuth {
		env = append(env, "TOLLGATE_KAFKA_TLS_TRUSTSTORE="+caFile)
	}
	inst := startKafka(t, env...)
	// The broker's logs go with its state when the test ends; a failed
	// test shows their ends first. Cleanups run last first, so this one
	// runs before the state is removed.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("private secure kafka logs:\n%s", inst.logTails(60))
		}
	})
	return &SecureKafka{
		Instance:       inst,
		Addr:           addr,
		PlainAddr:      inst.Addr,
		CAFile:         caFile,
		CAPEM:          caPEM,
		User:           user,
		Password:       password,
		ClientCertFile: clientCert,
		ClientKeyFile:  clientKey,
	}
}

// logTails is the last n lines of each of the instance's logs in its
// state directory.
func (i *Instance) logTails(n int) string {
	logs, _ := filepath.Glob(filepath.Join(i.stateDir(), "logs", i.Service+"*"))
	return tailFiles(logs, n)
}

// stateDir is the instance's state directory.
func (i *Instance) stateDir() string {
	var state string
	for _, kv := range i.env {
		if v, ok := strings.CutPrefix(kv, "TOLLGATE_STATE_DIR="); ok {
			state = v
		}
	}
	return state
}

// tailFiles is the last n lines of each of files that is not empty, each
// under its name.
func tailFiles(files []string, n int) string {
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		lines = lines[max(0, len(lines)-n):]
		b.WriteString("----- last lines of " + filepath.Base(f) + "\n")
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	return b.String()
}

// certificates are PEM blocks of a test CA, a server certificate it
// signed with its key, and a client certificate it signed with its key.
type certificates struct {
	ca, serverCert, serverKey, clientCert, clientKey []byte
}

// testCertificates makes a CA for this test, a server certificate it signs
// for the given IP addresses and DNS names (the first of them its common
// name) and a client certificate it signs. Keys are unencrypted PKCS#8.
func testCertificates(t testing.TB, hosts ...string) certificates {
	t.Helper()
	fail := func(what string, err error) {
		t.Helper()
		t.Fatalf("test certificates: %s: %v", what, err)
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("CA key", err)
	}
	ca := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "tollgate test CA " + Name(t)},
		NotBefore:             now.Add(-time.Hour), // a clock a little behind
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		fail("CA certificate", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("server key", err)
	}
	leaf := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			leaf.IPAddresses = append(leaf.IPAddresses, ip)
		} else {
			leaf.DNSNames = append(leaf.DNSNames, h)
		}
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		fail("CA certificate", err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		fail("server certificate", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		fail("server key", err)
	}
	clientKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("client key", err)
	}
	client := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: "tollgate test client " + Name(t)},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	clientDER, err := x509.CreateCertificate(rand.Reader, client, caCert, &clientKey.PublicKey, caKey)
	if err != nil {
		fail("client certificate", err)
	}
	clientKeyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		fail("client key", err)
	}
	return certificates{
		ca:         pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		serverCert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
		serverKey:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		clientCert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: clientDER}),
		clientKey:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: clientKeyDER}),
	}
}

// serial is a random certificate serial number, positive and at most 128
// bits, as RFC 5280 asks.
func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatalf("test certificates: serial number: %v", err)
	}
	return n.Add(n, big.NewInt(1))
}
