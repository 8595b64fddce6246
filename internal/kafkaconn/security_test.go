package kafkaconn

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go/sasl/plain"
)

// writeCertAndKey writes a self-signed certificate and its key as PEM
// files in dir.
func writeCertAndKey(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestBuildTurnsSettingsIntoTLSAndSASL(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeCertAndKey(t, dir)
	t.Run("the zero settings are plaintext without authentication", func(t *testing.T) {
		sec, err := Settings{}.Build("services.kafka_")
		if err != nil || sec.TLS != nil || sec.SASL != nil {
			t.Fatalf("Build = %+v, %v; want neither TLS nor SASL", sec, err)
		}
	})
	t.Run("TLS trusts the CA file and presents the client certificate", func(t *testing.T) {
		sec, err := Settings{TLS: true, CAFile: cert, CertFile: cert, KeyFile: key, ServerName: "kafka.internal"}.Build("services.kafka_")
		if err != nil {
			t.Fatal(err)
		}
		if sec.TLS == nil || sec.TLS.RootCAs == nil || len(sec.TLS.Certificates) != 1 || sec.TLS.ServerName != "kafka.internal" {
			t.Fatalf("TLS config = %+v", sec.TLS)
		}
		if sec.TLS.MinVersion < 0x0303 {
			t.Fatalf("MinVersion = %x, want TLS 1.2 or later", sec.TLS.MinVersion)
		}
	})
	t.Run("TLS without a CA file uses the system's roots", func(t *testing.T) {
		sec, err := Settings{TLS: true}.Build("services.kafka_")
		if err != nil || sec.TLS == nil || sec.TLS.RootCAs != nil {
			t.Fatalf("Build = %+v, %v; want TLS with the system's roots (nil RootCAs)", sec.TLS, err)
		}
	})
	for _, mech := range []string{"PLAIN", "scram-sha-256", " SCRAM-SHA-512 "} {
		t.Run("SASL "+strings.TrimSpace(mech)+" is built whatever its case", func(t *testing.T) {
			sec, err := Settings{SASLMechanism: mech, SASLUsername: "u", SASLPassword: "p"}.Build("services.kafka_")
			if err != nil || sec.SASL == nil || !strings.EqualFold(sec.SASL.Name(), strings.TrimSpace(mech)) {
				t.Fatalf("Build = %+v, %v; want the %s mechanism", sec.SASL, err, mech)
			}
		})
	}
	t.Run("PLAIN carries the credentials", func(t *testing.T) {
		sec, err := Settings{SASLMechanism: "PLAIN", SASLUsername: "u", SASLPassword: "p"}.Build("")
		if m, ok := sec.SASL.(plain.Mechanism); err != nil || !ok || m.Username != "u" || m.Password != "p" {
			t.Fatalf("Build = %+v, %v", sec.SASL, err)
		}
	})
}

func TestBuildRefusesWhatCannotWork(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeCertAndKey(t, dir)
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		s    Settings
		want []string
	}{
		{"TLS files with TLS off", Settings{CAFile: cert}, []string{"services.kafka_tls:", "TLS is off"}},
		{"a missing CA file", Settings{TLS: true, CAFile: filepath.Join(dir, "none.pem")}, []string{"services.kafka_tls_ca_file:", "no such file"}},
		{"a CA file without a certificate", Settings{TLS: true, CAFile: notPEM}, []string{"services.kafka_tls_ca_file:", "no PEM certificate"}},
		{"a certificate without its key", Settings{TLS: true, CertFile: cert}, []string{"give both or neither"}},
		{"a key that is not one", Settings{TLS: true, CertFile: cert, KeyFile: notPEM}, []string{"services.kafka_tls_cert_file and services.kafka_tls_key_file:"}},
		{"credentials without a mechanism", Settings{SASLUsername: "u", SASLPassword: "p"}, []string{"services.kafka_sasl_mechanism:", "without a mechanism"}},
		{"a mechanism without a password", Settings{SASLMechanism: "SCRAM-SHA-512", SASLUsername: "u"}, []string{"SCRAM-SHA-512 needs both"}},
		{"an unknown mechanism", Settings{SASLMechanism: "GSSAPI", SASLUsername: "u", SASLPassword: "p"}, []string{`"GSSAPI" is not one Tollgate speaks`}},
		{"every problem at once", Settings{CAFile: cert, CertFile: cert, KeyFile: key, SASLMechanism: "OAUTHBEARER"}, []string{"TLS is off", "OAUTHBEARER"}},
	} {
		t.Run(tc.name+" is refused", func(t *testing.T) {
			sec, err := tc.s.Build("services.kafka_")
			if err == nil {
				t.Fatalf("Build = %+v, nil; want an error", sec)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not say %q", err, w)
				}
			}
			if tc.s.SASLPassword != "" && strings.Contains(err.Error(), tc.s.SASLPassword+"\"") {
				t.Fatalf("error %q shows the password", err)
			}
		})
	}
}

func TestPlainSASLInClearIsOnlyPLAINWithoutTLS(t *testing.T) {
	for _, tc := range []struct {
		s    Settings
		want bool
	}{
		{Settings{SASLMechanism: "plain"}, true},
		{Settings{SASLMechanism: "PLAIN", TLS: true}, false},
		{Settings{SASLMechanism: "SCRAM-SHA-256"}, false},
		{Settings{}, false},
	} {
		if got := tc.s.PlainSASLInClear(); got != tc.want {
			t.Errorf("%+v: PlainSASLInClear = %v, want %v", tc.s, got, tc.want)
		}
	}
}
