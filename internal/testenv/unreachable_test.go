package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestSharedServicesAreReachable touches every shared service the way an
// integration test does. Run by itself it proves the services are up; run by
// the test below with one address pointing nowhere, it must fail.
func TestSharedServicesAreReachable(t *testing.T) {
	NewPostgres(t)
	NewClickHouse(t)
	NewTopic(t, 1)
	NewRedis(t)
	RequireStripeMock(t)
}

func TestMissingServiceFailsWithHowToStart(t *testing.T) {
	// 127.0.0.1:1 is a port nothing listens on.
	cases := []struct {
		service string
		env     string
		value   string
	}{
		{"PostgreSQL", "TOLLGATE_POSTGRES_URL", "postgres://tollgate@127.0.0.1:1/tollgate?sslmode=disable&connect_timeout=2"},
		{"ClickHouse", "TOLLGATE_CLICKHOUSE_ADDR", "127.0.0.1:1"},
		{"Kafka", "TOLLGATE_KAFKA_BROKERS", "127.0.0.1:1"},
		{"Redis", "TOLLGATE_REDIS_ADDR", "127.0.0.1:1"},
		{"stripe-mock", "TOLLGATE_STRIPE_MOCK_URL", "http://127.0.0.1:1"},
	}
	for _, c := range cases {
		t.Run("without "+c.service+" the test fails and says how to start it", func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestSharedServicesAreReachable$", "-test.count=1")
			cmd.Env = append(os.Environ(), c.env+"="+c.value)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the test passed with %s unreachable:\n%s", c.service, out)
			}
			text := string(out)
			for _, want := range []string{c.service + " is not reachable", "make services", "FAIL"} {
				if !strings.Contains(text, want) {
					t.Errorf("output lacks %q:\n%s", want, text)
				}
			}
			if strings.Contains(text, "SKIP") {
				t.Errorf("the test skipped instead of failing:\n%s", text)
			}
		})
	}
}
