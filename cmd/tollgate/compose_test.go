package main

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// composeService is what this test reads of a docker-compose.yml service.
type composeService struct {
	Command     []string          `yaml:"command"`
	Ports       []string          `yaml:"ports"`
	Environment map[string]string `yaml:"environment"`
}

// composeDefault is v as compose reads it with no variable of the host's
// set: ${NAME:-default} is its default, $$ a dollar.
func composeDefault(v string) string {
	v = regexp.MustCompile(`\$\{[A-Za-z0-9_]+:-([^}]*)\}`).ReplaceAllString(v, "$1")
	return strings.ReplaceAll(v, "$$", "$")
}

// TestDockerComposeTollgateIsReachableAndUsesStripeMock reads the tollgate
// service of docker-compose.yml as `tollgate all` would: every TOLLGATE_
// variable it sets is one the command reads (TOLLGATE_STRIPE_MOCK_URL is
// the demo's alone, so stripe-mock went unused), the configuration is
// valid, invoices go to stripe-mock, the edge's admin API is on with the
// documented development token by default, and every API the container serves
// (the edge, its admin API, the usage API, the invoice API) listens beyond
// the container's loopback and is published on the host's.
func TestDockerComposeTollgateIsReachableAndUsesStripeMock(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "docker-compose.yml"))
	testenv.Must(t, err, "read docker-compose.yml")
	var compose struct {
		Services map[string]composeService `yaml:"services"`
	}
	testenv.Must(t, yaml.Unmarshal(b, &compose), "parse docker-compose.yml")
	tg, ok := compose.Services["tollgate"]
	if !ok {
		t.Fatal("docker-compose.yml has no tollgate service")
	}
	if !slices.Equal(tg.Command, []string{"all"}) {
		t.Fatalf("the tollgate service runs %v, not [all]; this test reads its environment as `all` does", tg.Command)
	}

	read := map[string]bool{"TOLLGATE_KAFKA_BROKERS": true, "TOLLGATE_CONFIG": true}
	for name := range (&Config{}).envStrings() {
		read[name] = true
		t.Setenv(name, "") // the shell's own settings are not the container's
	}
	t.Setenv("TOLLGATE_KAFKA_BROKERS", "")
	for name, v := range tg.Environment {
		if !strings.HasPrefix(name, "TOLLGATE_") {
			continue
		}
		if !read[name] {
			t.Errorf("the tollgate service sets %s, which `tollgate all` does not read", name)
		}
		t.Setenv(name, composeDefault(v))
	}
	cfg, err := LoadConfig("")
	testenv.Must(t, err, "load the service's configuration")
	if err := cfg.Validate(); err != nil {
		t.Fatalf("the service's configuration is invalid:\n%v", err)
	}

	if s := cfg.Invoicer.Stripe; !strings.HasPrefix(s.APIKey, "sk_test_") || !strings.HasPrefix(s.APIURL, "http://stripe-mock:") {
		t.Errorf("invoices go to Stripe with key %q at %q, want a test key at http://stripe-mock:…", s.APIKey, s.APIURL)
	}

	if sum := sha256.Sum256([]byte("tollgate-dev-admin-token")); cfg.Edge.AdminTokenSHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("the admin token hash %s by default is not that of the documented development token", cfg.Edge.AdminTokenSHA256)
	}

	published := map[string]bool{}
	for _, p := range tg.Ports {
		parts := strings.Split(p, ":")
		if len(parts) != 3 || parts[0] != "127.0.0.1" {
			t.Errorf("port %q is not published on the host's 127.0.0.1 alone", p)
			continue
		}
		published[parts[2]] = true
	}
	for name, addr := range map[string]string{
		"edge.listen":       cfg.Edge.Listen,
		"edge.admin_listen": cfg.Edge.AdminListen,
		"aggregator.listen": cfg.Aggregator.Listen,
		"invoicer.listen":   cfg.Invoicer.Listen,
	} {
		host, port, err := net.SplitHostPort(addr)
		switch {
		case addr == "":
			t.Errorf("%s is off", name)
		case err != nil:
			t.Errorf("%s %q: %v", name, addr, err)
		case host != "0.0.0.0" && host != "":
			t.Errorf("%s is %s: unreachable from outside the container", name, addr)
		case !published[port]:
			t.Errorf("%s's port %s is not published", name, port)
		}
	}
}

// TestBothDockerIgnoreFilesLeaveOutTheSame checks .dockerignore (read by
// builders without BuildKit) against deploy/docker/Dockerfile.dockerignore
// (BuildKit's): left apart, one builder would send .run/ (the local
// services' data, gigabytes) as the build context.
func TestBothDockerIgnoreFilesLeaveOutTheSame(t *testing.T) {
	patterns := func(path string) []string {
		b, err := os.ReadFile(path)
		testenv.Must(t, err, "read "+path)
		var out []string
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				out = append(out, line)
			}
		}
		return out
	}
	root := patterns(filepath.Join("..", "..", ".dockerignore"))
	buildkit := patterns(filepath.Join("..", "..", "deploy", "docker", "Dockerfile.dockerignore"))
	if !slices.Equal(root, buildkit) || !slices.Contains(root, ".run") {
		t.Fatalf(".dockerignore %q and deploy/docker/Dockerfile.dockerignore %q differ, or leave .run in", root, buildkit)
	}
}
