package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestExampleConfigIsValid(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join("..", "..", "deploy", "tollgate.example.yaml"))
	if err != nil {
		t.Fatalf("load the example configuration: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("the example configuration is invalid:\n%v", err)
	}
	if len(cfg.Meters) != 2 || len(cfg.Edge.Routes) != 4 {
		t.Fatalf("example read as %d meters and %d routes, want 2 and 4", len(cfg.Meters), len(cfg.Edge.Routes))
	}
}

func TestConfigProblemsAreAllReported(t *testing.T) {
	t.Run("unknown keys are refused", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte("edge:\n  listne: 127.0.0.1:1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadConfig(p); err == nil || !strings.Contains(err.Error(), "listne") {
			t.Fatalf("got %v, want an error naming the unknown key", err)
		}
	})
	t.Run("every invalid field is named at once", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		body := "edge:\n  upstream: not-a-url\n  max_upgraded_connections: -1\n  upgraded_idle_timeout: 10ms\n  upstream_ca_file: no-such-ca.pem\n  tls_cert_file: cert.pem\n  cors:\n    allowed_origins: [\"app.example.com/path\"]\ningest:\n  batch_size: -1\ninvoicer:\n  listen: nowhere\n"
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p)
		if err != nil {
			t.Fatal(err)
		}
		err = cfg.Validate()
		if err == nil {
			t.Fatal("want errors")
		}
		for _, want := range []string{"edge.upstream", "edge.max_upgraded_connections", "edge.upgraded_idle_timeout", "edge.cors.allowed_origins", "edge.upstream_ca_file", "edge.tls_cert_file", "ingest.batch_size", "invoicer.listen"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error lacks %s:\n%v", want, err)
			}
		}
	})
}
