package tlsclient

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigIsNilWhenTLSIsOffAndRefusesFilesWithoutIt(t *testing.T) {
	c, err := Files{}.Config("services.redis_")
	if c != nil || err != nil {
		t.Fatalf("Config of nothing = %v, %v; want no TLS and no error", c, err)
	}
	_, err = Files{CAFile: "ca.pem"}.Config("services.redis_")
	if err == nil || !strings.Contains(err.Error(), "services.redis_tls: the TLS settings are given but TLS is off") {
		t.Fatalf("a CA file with TLS off: %v; want it refused, naming services.redis_tls", err)
	}
}

func TestConfigNamesEachSettingAtFault(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Files{Enabled: true, CAFile: junk, CertFile: junk}.Config("services.clickhouse_")
	for _, want := range []string{"services.clickhouse_tls_ca_file: " + junk + " holds no PEM certificate",
		"services.clickhouse_tls_cert_file and services.clickhouse_tls_key_file: give both or neither"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("Config = %v; want it to say %q", err, want)
		}
	}
	c, err := Files{Enabled: true, ServerName: "ch.internal"}.Config("services.clickhouse_")
	if err != nil || c.ServerName != "ch.internal" || c.MinVersion != tls.VersionTLS12 || c.RootCAs != nil {
		t.Fatalf("Config = %+v, %v; want TLS 1.2 or later to ch.internal against the system's roots", c, err)
	}
}
