package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func TestExampleConfigIsValid(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join("..", "..", "deploy", "tollgate.example.yaml"))
	if err != nil {
		t.Fatalf("load the example configuration: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("the example configuration is invalid:\n%v", err)
	}
	// It says it holds the defaults (its upstream aside): so it must.
	t.Setenv("TOLLGATE_EDGE_UPSTREAM", cfg.Edge.Upstream)
	defaults, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	// An empty list written as [] is no list.
	for _, c := range []*Config{&cfg, &defaults} {
		if len(c.Edge.Routes) == 0 {
			c.Edge.Routes = nil
		}
		if len(c.Edge.CORS.AllowedOrigins) == 0 {
			c.Edge.CORS.AllowedOrigins = nil
		}
	}
	if !reflect.DeepEqual(cfg, defaults) {
		t.Errorf("the example configuration is not the defaults:\n example  %+v\n defaults %+v", cfg, defaults)
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
		body := "edge:\n  upstream: not-a-url\n  max_upgraded_connections: -1\n  upgraded_idle_timeout: 10ms\n  spool_max_bytes: 1000\n  upstream_idle_timeout: -1s\n  upgrade_protocols: [\"web socket\"]\n  upstream_ca_file: no-such-ca.pem\n  tls_cert_file: cert.pem\n  cors:\n    allowed_origins: [\"app.example.com/path\"]\ningest:\n  batch_size: -1\ninvoicer:\n  listen: nowhere\n"
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
		for _, want := range []string{"edge.upstream", "edge.max_upgraded_connections", "edge.upgraded_idle_timeout", "edge.spool_max_bytes", "edge.upstream_idle_timeout", "edge.upgrade_protocols", "edge.cors.allowed_origins", "edge.upstream_ca_file", "edge.tls_cert_file", "ingest.batch_size", "invoicer.listen"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error lacks %s:\n%v", want, err)
			}
		}
	})
}

// writeConfig writes body to a configuration file and loads it, with an
// upstream set so that only what a case is about can be invalid.
func writeConfig(t *testing.T, body string) Config {
	t.Helper()
	t.Setenv("TOLLGATE_EDGE_UPSTREAM", "http://127.0.0.1:9000")
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(p)
	if err != nil {
		t.Fatalf("load %q: %v", body, err)
	}
	return cfg
}

func TestCheckConfigRefusesWhatWouldFailOrMisbehaveAtStart(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		// components validated (none: check-config's every section)
		components []string
		want       string
	}{
		{"an edge listen address without a port is refused", "edge:\n  listen: not-an-address\n", nil, "edge.listen"},
		{"an edge admin address with a port out of range is refused", "edge:\n  admin_listen: 127.0.0.1:99999\n  admin_token_sha256: " + strings.Repeat("0", 64) + "\n", nil, "edge.admin_listen"},
		{"an aggregator listen address of colons is refused", "aggregator:\n  listen: \":::::\"\n", nil, "aggregator.listen"},
		{"an aggregator metrics address with a named port is refused", "aggregator:\n  metrics_listen: \":metrics\"\n", []string{"aggregate"}, "aggregator.metrics_listen"},
		{"an ingest metrics address with a bad host is refused", "ingest:\n  metrics_listen: \"a b:9100\"\n", []string{"ingest"}, "ingest.metrics_listen"},
		{"an invoicer listen address with a bad port is refused", "invoicer:\n  listen: 127.0.0.1:99999\n", []string{"invoice"}, "invoicer.listen"},
		{"a dashboard listen address without a port is refused", "dashboard:\n  listen: localhost\n", []string{"dashboard"}, "dashboard.listen"},
		{"a dashboard usage API that is not a URL is refused", "dashboard:\n  usage_api: \"::bad\"\n", nil, "dashboard.usage_api"},
		{"a dashboard invoice API on another scheme is refused", "dashboard:\n  invoice_api: ftp://billing\n", nil, "dashboard.invoice_api"},
		{"an edge trusted proxy given by name is refused", "edge:\n  trusted_proxies: [lb.internal]\n", nil, "edge.trusted_proxies"},
		{"an aggregator trusted proxy range past 32 bits is refused", "aggregator:\n  trusted_proxies: [10.0.0.0/33]\n", []string{"aggregate"}, "aggregator.trusted_proxies"},
		{"an invoicer trusted proxy that is not an address is refused", "invoicer:\n  trusted_proxies: [\"*\"]\n", []string{"invoice"}, "invoicer.trusted_proxies"},
		{"a ClickHouse database name with a dash is refused", "services:\n  clickhouse_database: tollgate-prod\n", []string{"invoice"}, "services.clickhouse_database"},
		{"a Kafka broker without a host is refused", "services:\n  kafka_brokers: [\":9092\"]\n", nil, "services.kafka_brokers[0]"},
		{"a Kafka SASL mechanism Tollgate does not speak is refused", "services:\n  kafka_sasl_mechanism: GSSAPI\n  kafka_sasl_username: u\n", []string{"edge"}, "services.kafka_sasl_mechanism"},
		{"Kafka SASL without a password is refused", "services:\n  kafka_sasl_mechanism: SCRAM-SHA-512\n  kafka_sasl_username: u\n", []string{"ingest"}, "services.kafka_sasl_username and services.kafka_sasl_password"},
		{"a Kafka CA file that is not there is refused", "services:\n  kafka_tls: true\n  kafka_tls_ca_file: /nonexistent/ca.pem\n", []string{"invoice"}, "services.kafka_tls_ca_file"},
		{"a Redis CA file that is not there is refused", "services:\n  redis_tls: true\n  redis_tls_ca_file: /nonexistent/ca.pem\n", []string{"edge"}, "services.redis_tls_ca_file"},
		{"a ClickHouse client certificate without its key is refused", "services:\n  clickhouse_tls: true\n  clickhouse_tls_cert_file: /nonexistent/c.pem\n", []string{"aggregate"}, "services.clickhouse_tls_cert_file and services.clickhouse_tls_key_file: give both or neither"},
		{"ClickHouse TLS settings with TLS off are refused", "services:\n  clickhouse_tls_server_name: ch.internal\n", []string{"invoice"}, "services.clickhouse_tls: the TLS settings are given but TLS is off"},
		{"Kafka TLS files with TLS off are refused", "services:\n  kafka_tls_server_name: kafka.internal\n", nil, "services.kafka_tls: the TLS settings are given but TLS is off"},
		{"an invoicer interval under a second is refused", "invoicer:\n  interval: 1ns\n", []string{"invoice"}, "invoicer.interval: at least 1s"},
		{"a negative monthly quota is refused", "edge:\n  plans:\n    free:\n      limits: {requests_per_second: 5, burst: 10, monthly_requests: -5}\n", []string{"edge"}, "edge.plans.free.limits.monthly_requests"},
		{"a usage topic name Kafka refuses is refused for the edge", "ingest:\n  topic: usage events\n", []string{"edge"}, "ingest.topic"},
		{"a usage topic name Kafka refuses is refused once for every component", "ingest:\n  topic: usage events\n", nil, "ingest.topic"},
		{"a dead-letter topic named .. is refused", "ingest:\n  dead_letter_topic: \"..\"\n", []string{"ingest"}, "ingest.dead_letter_topic"},
		{"a batch size no process could hold is refused", "ingest:\n  batch_size: 400000000\n  max_in_flight_records: 400000000\n", []string{"ingest"}, "ingest.batch_size"},
		{"two components of tollgate all on one port are refused", "edge:\n  listen: 127.0.0.1:18181\ninvoicer:\n  listen: 127.0.0.1:18181\n", nil, "invoicer.listen: 127.0.0.1:18181 is also edge.listen's"},
		{"one port under two names of one host clashes", "edge:\n  listen: 127.0.0.1:18185\n  admin_listen: localhost:18185\n  admin_token_sha256: " + strings.Repeat("0", 64) + "\n", nil, "edge.admin_listen: localhost:18185 is also edge.listen's"},
		{"a port by number and by service name clashes", "edge:\n  listen: 127.0.0.1:80\ndashboard:\n  listen: 127.0.0.1:http\n", nil, "is also edge.listen's"},
		{"a port every interface takes clashes with one host's", "ingest:\n  metrics_listen: \":18284\"\naggregator:\n  metrics_listen: 127.0.0.1:18284\n", nil, "aggregator.metrics_listen"},
		{"an edge event type ingest would dead-letter is refused", "edge:\n  event_type: api-call\n", []string{"edge"}, "edge.event_type"},
		{"an upstream with credentials the edge would not send is refused", "edge:\n  sandbox_upstream: https://svc:pw@sandbox.internal\n", []string{"edge"}, "edge.sandbox_upstream"},
		{"an upstream whose password reads as its query is refused", "edge:\n  sandbox_upstream: \"https://svc:8443?pw@sandbox.internal\"\n", []string{"edge"}, "edge.sandbox_upstream"},
		{"a usage API CORS pattern with a path is refused", "aggregator:\n  cors_origins: [\"https://*.example.com/\"]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"a usage API CORS pattern with a space is refused", "aggregator:\n  cors_origins: [\"https://*.example.com \"]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"a usage API CORS origin in upper case is refused", "aggregator:\n  cors_origins: [\"https://App.example.com\"]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"a usage API CORS pattern with a user is refused", "aggregator:\n  cors_origins: [\"https://u@*.example.com\"]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"a Stripe API URL without a scheme is refused", "invoicer:\n  stripe:\n    api_url: stripe-mock:12111\n", []string{"invoice"}, "invoicer.stripe.api_url"},
		{"a usage API CORS origin with a path is refused", "aggregator:\n  cors_origins: [\"https://app.example.com/\"]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"a usage API CORS origin without a scheme is refused", "aggregator:\n  cors_origins: [app.example.com]\n", []string{"aggregate"}, "aggregator.cors_origins"},
		{"the invoicer refuses a meter defined twice", "meters:\n  - {key: calls, event_type: api_call, aggregation: COUNT}\n  - {key: calls, event_type: api_call, aggregation: COUNT}\n", []string{"invoice"}, "meters:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, env := range []string{"TOLLGATE_KAFKA_BROKERS", "TOLLGATE_CLICKHOUSE_DATABASE"} {
				t.Setenv(env, "")
			}
			cfg := writeConfig(t, tc.body)
			err := cfg.Validate(tc.components...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate(%v) = %v, want an error naming %s", tc.components, err, tc.want)
			}
			// Each problem is said once (the usage topic was said twice
			// when both the edge and ingest were checked).
			seen := map[string]bool{}
			for _, line := range strings.Split(err.Error(), "\n") {
				if seen[line] {
					t.Errorf("Validate(%v) says %q twice", tc.components, line)
				}
				seen[line] = true
			}
		})
	}

	t.Run("a refused URL is quoted without its password", func(t *testing.T) {
		cfg := writeConfig(t, "edge:\n  sandbox_upstream: \"https://user:s3cret@\"\ndashboard:\n  usage_api: \"https://user:s3cret@::bad\"\n  invoice_api: \"http://u:pw/s3cret@host:80\"\n"+
			"invoicer:\n  stripe:\n    api_url: \"http://svc:8080?s3cret@stripe\"\n")
		err := cfg.Validate()
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("Validate() = %v; want the URLs refused, their password not quoted", err)
		}
		for _, want := range []string{"dashboard.usage_api", "dashboard.invoice_api", "edge.sandbox_upstream", "invoicer.stripe.api_url"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("Validate() = %v; want %s refused", err, want)
			}
		}
	})

	t.Run("a password that reads as a port is not quoted", func(t *testing.T) {
		for _, v := range []string{"http://dash:s3cr?et@usage.internal:8080", "http://dash:s3cr/et@usage.internal:8080", "http://dash:s3cr#et@usage.internal:8080"} {
			cfg := writeConfig(t, "dashboard:\n  usage_api: \""+v+"\"\n")
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), "dashboard.usage_api") || strings.Contains(err.Error(), "s3cr") {
				t.Errorf("usage_api %q: Validate() = %v; want it refused, no part of its password quoted", v, err)
			}
		}
	})

	// Container names with underscores, IPv6 zones and service names
	// are what Go's resolver takes, and were refused once.
	t.Run("addresses an operator writes are accepted", func(t *testing.T) {
		cfg := writeConfig(t, `edge:
  listen: ":8080"
  sandbox_upstream: "https://registry.internal/@acme/v1?contact=ops@acme.example"
  admin_listen: "[::1]:9090"
  admin_token_sha256: `+strings.Repeat("0", 64)+`
  plans:
    free:
      limits: {requests_per_second: 5, burst: 10, monthly_requests: 0}
ingest:
  metrics_listen: 0.0.0.0:9100
aggregator:
  listen: localhost:0
  metrics_listen: ""
  cors_origins: ["*", "https://app.example.com", "https://*.example.com", "http://localhost:5173", "http://localhost:*", "http*://app.example.com", "https://*", "http://[::1]:*"]
invoicer:
  listen: tollgate.internal:8082
  interval: 1s
  stripe:
    api_url: http://127.0.0.1:12111
dashboard:
  listen: "[fe80::1%lo]:8090"
  usage_api: https://usage.example.com/base
  invoice_api: 127.0.0.1:8082
services:
  kafka_brokers: [project_kafka_1:9092, "kafka-2.internal:9092"]
  redis_addr: localhost:6379
  clickhouse_addr: "clickhouse_1:http"
`)
		if err := cfg.Validate(); err != nil {
			t.Fatalf("want valid, got:\n%v", err)
		}
	})
}

func TestConfigFileDocuments(t *testing.T) {
	defaults, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		"an empty file means every default":                     "",
		"a file of comments only means every default":           "# nothing changed yet\n\n# edge:\n#   listen: 127.0.0.1:8080\n",
		"a lone document marker means every default":            "---\n",
		"a trailing document marker with nothing after is read": "---\n# the defaults\n...\n",
	} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadConfig(p)
			if err != nil {
				t.Fatalf("load: %v", err)
			}
			if cfg.Edge.Listen != defaults.Edge.Listen || cfg.Services.ClickHouseDatabase != defaults.Services.ClickHouseDatabase || len(cfg.Meters) != 1 {
				t.Fatalf("read as %+v, want the defaults", cfg)
			}
		})
	}
	t.Run("an empty document after the first is ignored", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte("edge:\n  listen: 127.0.0.1:1\n---\n# nothing here\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p)
		if err != nil || cfg.Edge.Listen != "127.0.0.1:1" {
			t.Fatalf("got listen %q, %v; want 127.0.0.1:1 read without error", cfg.Edge.Listen, err)
		}
	})
	t.Run("a second document is refused with its line", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte("edge:\n  listen: 127.0.0.1:1\n---\ninvoicer:\n  interval: 5m\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadConfig(p)
		if err == nil || !strings.Contains(err.Error(), "line 4: a second YAML document") {
			t.Fatalf("got %v, want the second document refused at line 4", err)
		}
	})
}

// Setting only ingest.max_lateness keeps edge.max_event_age under it, for
// a short lateness too: at 48h or less the edge kept its 34 days, and the
// configuration was refused over a key the operator never set.
func TestMaxEventAgeFollowsAShortLateness(t *testing.T) {
	for lateness, want := range map[string]time.Duration{"840h": 816 * time.Hour, "72h": 48 * time.Hour, "24h": 12 * time.Hour,
		"2h": time.Hour, "150m": 75 * time.Minute} {
		cfg := writeConfig(t, "ingest:\n  max_lateness: "+lateness+"\n")
		if err := cfg.Validate(); err != nil || cfg.Edge.MaxEventAge != want {
			t.Errorf("max_lateness %s: edge.max_event_age %s (%v), want %s and valid", lateness, cfg.Edge.MaxEventAge, err, want)
		}
	}
}

// The edge's limit on a reported event's age stays at least ten minutes
// under the lateness ingest counts: ingest measures from the Kafka record's
// time, later than the edge's check, so with the two equal (max_lateness
// 1h, which the edge's 1h floor made its default) an event the edge
// accepted near the limit was set aside and never counted.
func TestTheEdgesEventAgeLeavesRoomUnderTheLateness(t *testing.T) {
	for _, c := range []struct{ yaml, want string }{
		{"ingest:\n  max_lateness: 1h\n", "ingest.max_lateness: must be at least 2h"},
		{"ingest:\n  max_lateness: 90m\n", "ingest.max_lateness: must be at least 2h"},
		{"ingest:\n  max_lateness: 3h\nedge:\n  max_event_age: 3h\n", "leaves less than 10m0s under ingest.max_lateness"},
		{"ingest:\n  max_lateness: 3h\nedge:\n  max_event_age: 2h55m\n", "leaves less than 10m0s under ingest.max_lateness"},
	} {
		cfg := writeConfig(t, c.yaml)
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.yaml, err, c.want)
		}
	}
	if cfg := writeConfig(t, "ingest:\n  max_lateness: 3h\nedge:\n  max_event_age: 2h50m\n"); cfg.Validate() != nil {
		t.Errorf("an age ten minutes under the lateness: %v", cfg.Validate())
	}
}

// A Postgres URL the driver cannot parse is refused by check-config, and
// no part of its password is shown: the driver's message, with an
// unencoded "@" in the password, printed the part after it.
func TestAnUnparsablePostgresURLIsRefusedWithoutItsPassword(t *testing.T) {
	for _, u := range []string{"postgres://u:S3C@RET@127.0.0.1:99999/db", "postgres://u:hunter2@127.0.0.1:5432/db?sslmode=bogus",
		"postgres://u:se/cret@127.0.0.1:5432/db", "postgres://u@127.0.0.1:99999/db?password=hunter2",
		"host=127.0.0.1 port=abc user=u password=hunter2",
		// A password holding @ and then a ?: the URL parser reads what
		// follows as the host.
		"postgres://tollgate:S3C@RET?cret@db.internal:5432/tollgate",
		// A setting of pgx's own with a bad value, which the connection
		// parser passes on unread: pgx's refusal quotes the string, where
		// "password = " and an escaped quote defeat its masking.
		"host=127.0.0.1 port=15432 user=u password = hunter2 default_query_exec_mode=simple-protocol",
		`host=127.0.0.1 user=u password='it\'s hunter2 words' statement_cache_capacity=x`,
		"postgres://u:hunter2@127.0.0.1:5432/db?pool_max_conns=lots"} {
		t.Setenv("TOLLGATE_POSTGRES_URL", u)
		cfg := writeConfig(t, "")
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), "services.postgres_url") || strings.Contains(err.Error(), "RET") ||
			strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "S3C") || strings.Contains(err.Error(), "cret") {
			t.Errorf("%s: %v; want it refused without its password", u, err)
		}
	}
}

// Flags that cannot mean anything are refused before any service is
// reached (here the services are ports where nothing listens, so a command
// that went on would fail on its connection instead).
func TestCommandsRefuseMeaninglessFlagsBeforeConnecting(t *testing.T) {
	t.Setenv("TOLLGATE_EDGE_UPSTREAM", "http://127.0.0.1:9000")
	t.Setenv("TOLLGATE_POSTGRES_URL", "postgres://tollgate@127.0.0.1:1/tollgate?sslmode=disable")
	t.Setenv("TOLLGATE_CLICKHOUSE_ADDR", "127.0.0.1:1")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"invoice", "credit-note", "inv_x", "--reason", "outage"}, "--amount"},
		{[]string{"invoice", "credit-note", "inv_x", "--reason", "outage", "--amount", "-5"}, "--amount"},
		{[]string{"invoice", "replay", "--batch", "-5"}, "--batch"},
		{[]string{"aggregate", "rebuild", "--from", "2026-03-02T00:00:00Z", "--to", "2026-03-01T00:00:00Z"}, "not before --to"},
	} {
		root := newRootCommand()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(append(c.args, "--log-level", "error"))
		if err := root.ExecuteContext(context.Background()); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("tollgate %s: %v; want it refused naming %s", strings.Join(c.args, " "), err, c.want)
		}
	}
}

// The driver's refusal of a connection string, met past check-config (an
// older configuration, another parser), is passed on without the string.
func TestTheDriversRefusalOfAConnectionStringIsNotQuoted(t *testing.T) {
	_, err := pgx.ParseConfig("host=127.0.0.1 user=u password = hunter2 default_query_exec_mode=simple-protocol")
	if err == nil || !strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("the driver's own refusal: %v; this test wants one that quotes the password", err)
	}
	if got := withoutConnString(fmt.Errorf("connect: %w", err)); got == nil || strings.Contains(got.Error(), "hunter2") {
		t.Fatalf("passed on as %v; want a message without the password", got)
	}
}

// An edge.event_type that no configured meter counts is valid (a meter
// created through the admin API may count it) but is said: every call
// would land in ClickHouse and be in no usage and no invoice.
func TestAnEventTypeNoMeterCountsIsWarnedOf(t *testing.T) {
	for _, c := range []struct {
		name, body string
		warned     bool
	}{
		{"the defaults", "# every default\n", false},
		{"a renamed event type under the default meters", "edge:\n  event_type: http_call\n", true},
		{"a renamed event type a meter counts", "edge:\n  event_type: http_call\nmeters:\n  - {key: calls, event_type: http_call, aggregation: COUNT}\n", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := writeConfig(t, c.body)
			if err := cfg.Validate(); err != nil {
				t.Fatalf("validate: %v", err)
			}
			ws := cfg.Warnings()
			if got := len(ws) == 1 && strings.Contains(ws[0], "edge.event_type"); got != c.warned || !c.warned && len(ws) != 0 {
				t.Fatalf("warnings %q, want a warning about edge.event_type: %v", ws, c.warned)
			}
			if ws := cfg.Warnings("ingest"); len(ws) != 0 {
				t.Fatalf("warnings for ingest alone %q, want none (the edge's event type is the edge's)", ws)
			}
		})
	}
}

// A secret written in the configuration file is used, and warned of: the
// README says secrets belong in the environment, and a file is easily
// committed or shared. One given through the environment is not.
func TestASecretWrittenInTheFileIsWarnedOf(t *testing.T) {
	cfg := writeConfig(t, "services:\n  clickhouse_password: hunter2\n  redis_password: hunter3\n"+
		"  postgres_url: postgres://tollgate:hunter4@127.0.0.1:15432/tollgate?sslmode=disable\n"+
		"invoicer:\n  stripe:\n    api_key: sk_test_abc\n    webhook_secret: whsec_x\n")
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	ws := strings.Join(cfg.Warnings("ingest"), "\n")
	for _, name := range []string{"services.clickhouse_password", "services.redis_password", "services.postgres_url",
		"invoicer.stripe.api_key", "invoicer.stripe.webhook_secret"} {
		if !strings.Contains(ws, name) {
			t.Errorf("no warning about %s in %q", name, ws)
		}
	}
	for _, secret := range []string{"hunter2", "hunter3", "hunter4", "sk_test_abc", "whsec_x"} {
		if strings.Contains(ws, secret) {
			t.Errorf("a warning quotes the secret %q", secret)
		}
	}
	// The two other forms Postgres takes a password in.
	for _, conn := range []string{"postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable&password=hunter5",
		"host=127.0.0.1 port=15432 user=tollgate password = hunter5 dbname=tollgate",
		// Read as the driver reads them: a password holding "#" or "?",
		// several hosts, a parameter after several hosts.
		"postgres://tollgate:hunter5#x@127.0.0.1:15432/tollgate", "postgres://tollgate:hunter5?x@127.0.0.1:15432/tollgate",
		"postgres://tollgate:hunter5@h1:5432,h2/tollgate", "postgres://tollgate@h1:5432,h2/tollgate?password=hunter5",
		// No path, and a key percent-encoded.
		"postgres://tollgate@127.0.0.1:15432?password=hunter5", "postgresql://localhost?sslmode=disable&password=hunter5",
		"postgres://tollgate@h/tollgate?pass%77ord=hunter5",
		// A ";" is a byte like any other; the last key stands.
		"postgres://tollgate@h:15432/tollgate?password=hunter;5", "postgres://tollgate@h:15432/tollgate?application_name=a;b&password=hunter5",
		"postgres://tollgate@h:15432/tollgate?password=&password=hunter5", "host=h password='' password=hunter5",
		// Read as the driver tokenises: an escaped space inside a value, a
		// password of one space written %20.
		`host=h password=hunter5 options=x\ password=`, "postgres://u@h/db?password=%20"} {
		cfg := writeConfig(t, "services:\n  postgres_url: "+strconv.Quote(conn)+"\n")
		if ws := strings.Join(cfg.Warnings(), "\n"); !strings.Contains(ws, "services.postgres_url") || strings.Contains(ws, "hunter5") {
			t.Errorf("postgres_url %q: warnings %q; want one about services.postgres_url, without the password", conn, ws)
		}
	}
	for _, conn := range []string{"postgres://tollgate@127.0.0.1:15432/password?sslmode=disable", "postgres://tollgate@h/tollgate?options=-c%20password%3Dx",
		"postgres://tollgate:@h/tollgate", "postgres://[::1]:5432/db", "postgres://u@[::1]:5432/db@x", "postgres:///db?host=/var/run/postgresql",
		"host=h password=", "host=h password=''", "postgres://h?user=a@b",
		"host=h application_name='a password=x'", "postgres://u@h/db?%20password=x"} {
		cfg := writeConfig(t, "services:\n  postgres_url: "+strconv.Quote(conn)+"\n")
		if ws := cfg.Warnings(); len(ws) != 0 {
			t.Errorf("postgres_url %q holds no password: warnings %q", conn, ws)
		}
	}
	t.Setenv("TOLLGATE_REDIS_PASSWORD", "from-env")
	t.Setenv("TOLLGATE_STRIPE_API_KEY", "sk_test_env")
	cfg = writeConfig(t, "# every default\n")
	if ws := cfg.Warnings(); len(ws) != 0 || cfg.Services.RedisPassword != "from-env" {
		t.Fatalf("secrets from the environment: warnings %q, redis password %q", ws, cfg.Services.RedisPassword)
	}
}

// The dashboard's command validates its own settings: no dashboard.listen
// is a configuration error naming it (`tollgate all` merely serves no
// dashboard without it).
func TestTheDashboardNeedsItsListenAddress(t *testing.T) {
	cfg := writeConfig(t, "# every default\n")
	if err := cfg.Validate("dashboard"); err == nil || !strings.Contains(err.Error(), "dashboard.listen") {
		t.Fatalf("validate the dashboard without dashboard.listen: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate everything (the dashboard optional): %v", err)
	}
}

// TestEveryConfigurationExampleInTheDocsLoads reads each ```yaml block of
// the README and docs/ as a configuration file, strictly: an operator who
// copies one gets what the docs say, not a parse error. (The route table
// of docs/edge.md held `{id}` unquoted in a flow mapping, which YAML reads
// as a nested mapping, so `tollgate` refused the whole file.)
func TestEveryConfigurationExampleInTheDocsLoads(t *testing.T) {
	files, err := filepath.Glob("../../docs/*.md")
	if err != nil || len(files) == 0 {
		t.Fatalf("no docs found (%v)", err)
	}
	files = append(files, "../../README.md")
	blocks := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(b), "\n")
		for i := 0; i < len(lines); i++ {
			if strings.TrimSpace(lines[i]) != "```yaml" {
				continue
			}
			start := i + 1
			end := start
			for end < len(lines) && strings.TrimSpace(lines[end]) != "```" {
				end++
			}
			i = end
			blocks++
			name := fmt.Sprintf("%s:%d", filepath.Base(f), start)
			t.Run(name, func(t *testing.T) {
				var c Config
				if err := decodeConfig([]byte(strings.Join(lines[start:end], "\n")), &c); err != nil {
					t.Fatalf("the example at %s does not load: %v", name, err)
				}
			})
		}
	}
	if blocks == 0 {
		t.Fatal("no ```yaml blocks found in the docs")
	}
}

// TestMigrateAndDemoWarnOfSecretsInTheFile: the README says every command
// that reads the configuration file warns of a secret written in it; migrate
// and demo, which load the file without loadFor, did not.
func TestMigrateAndDemoWarnOfSecretsInTheFile(t *testing.T) {
	// The file's settings stand: none is replaced from the environment
	// (make test sets the services' addresses there).
	for name := range (&Config{}).envStrings() {
		t.Setenv(name, "")
	}
	t.Setenv("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:1")
	p := filepath.Join(t.TempDir(), "c.yaml")
	// Nothing listens on port 1: each command fails at its first
	// connection, after reading the file.
	body := "services:\n  clickhouse_password: hunter2\n  clickhouse_addr: 127.0.0.1:1\n" +
		"  postgres_url: postgres://tollgate:hunter4@127.0.0.1:1/tollgate?sslmode=disable\n"
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"migrate"}, {"demo", "--once", "--calls", "0"}} {
		t.Run(args[0]+" warns", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			root := newRootCommand()
			var out bytes.Buffer
			root.SetOut(&out)
			root.SetErr(&out)
			root.SetArgs(append(args, "-c", p))
			err := root.ExecuteContext(ctx)
			if err == nil {
				t.Fatalf("tollgate %s succeeded with nothing to connect to", args[0])
			}
			t.Logf("tollgate %s: %v", args[0], err)
			for _, name := range []string{"services.clickhouse_password", "services.postgres_url"} {
				if !strings.Contains(out.String(), name) {
					t.Errorf("tollgate %s: no warning about %s in its output:\n%s", args[0], name, out.String())
				}
			}
			if strings.Contains(out.String(), "hunter2") || strings.Contains(out.String(), "hunter4") {
				t.Errorf("tollgate %s: its output quotes a secret:\n%s", args[0], out.String())
			}
		})
	}
}

// TestARefusedServiceAddressDoesNotQuoteItsPassword: a URL or DSN pasted
// where host:port belongs (redis://:pw@host:6379, as platforms hand them
// out) is refused, and the refusal, printed by check-config and at every
// start, does not quote the password; nor does a refused Stripe API URL
// quote a key in its query.
func TestARefusedServiceAddressDoesNotQuoteItsPassword(t *testing.T) {
	for _, c := range []struct{ env, value, field string }{
		{"TOLLGATE_REDIS_ADDR", "redis://:SEKRIT-123@redis.internal:6379", "services.redis_addr"},
		{"TOLLGATE_REDIS_ADDR", "default:SEKRIT-123@redis.internal:6379", "services.redis_addr"},
		{"TOLLGATE_CLICKHOUSE_ADDR", "clickhouse://default:SEKRIT-123@ch.internal:9000", "services.clickhouse_addr"},
		{"TOLLGATE_KAFKA_BROKERS", "user:SEKRIT-123@kafka.internal:9092", "services.kafka_brokers[0]"},
		{"TOLLGATE_STRIPE_API_URL", "https://stripe-proxy.internal/?api_key=SEKRIT-123", "invoicer.stripe.api_url"},
		{"TOLLGATE_REDIS_ADDR", "myredis.redis.cache.windows.net:6380,password=SEKRIT-123,ssl=True,abortConnect=False", "services.redis_addr"},
		{"TOLLGATE_REDIS_ADDR", "redis.internal:6379?password=SEKRIT-123", "services.redis_addr"},
		{"TOLLGATE_CLICKHOUSE_ADDR", "ch.internal:9000;password=SEKRIT-123", "services.clickhouse_addr"},
	} {
		t.Run(c.field, func(t *testing.T) {
			t.Setenv(c.env, c.value)
			cfg := writeConfig(t, "")
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("Validate = %v; want %s refused", err, c.field)
			}
			if strings.Contains(err.Error(), "SEKRIT") {
				t.Fatalf("the refusal quotes the secret: %v", err)
			}
		})
	}
}

// TestAnUnquotedSecretStartingWithAStarIsNotQuotedBack: YAML reads it as an
// alias, and its parse error printed the rest of the value.
func TestAnUnquotedSecretStartingWithAStarIsNotQuotedBack(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	for _, body := range []string{"services:\n  redis_password: *SEKRIT-123\n",
		// In a second document, which is refused, but not by quoting it.
		"services:\n  redis_addr: 127.0.0.1:6379\n---\nservices:\n  redis_password: *SEKRIT-123\n"} {
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadConfig(p)
		if err == nil || !strings.Contains(err.Error(), "quote the value") || strings.Contains(err.Error(), "SEKRIT") {
			t.Fatalf("LoadConfig = %v; want it refused, saying to quote the value, without quoting it", err)
		}
	}
}

// Kafka's SASL password is a secret like the others: warned of when the
// file gives it, never quoted; PLAIN without TLS is warned of too, since
// it sends the password as it is.
func TestKafkaCredentialsAreWarnedOfAndReadFromTheEnvironment(t *testing.T) {
	cfg := writeConfig(t, "services:\n  kafka_sasl_mechanism: PLAIN\n  kafka_sasl_username: tollgate\n  kafka_sasl_password: hunter6\n")
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	ws := strings.Join(cfg.Warnings("ingest"), "\n")
	for _, want := range []string{"services.kafka_sasl_password is written in the configuration file", "TOLLGATE_KAFKA_SASL_PASSWORD",
		"PLAIN without services.kafka_tls sends the password"} {
		if !strings.Contains(ws, want) {
			t.Errorf("no warning saying %q in %q", want, ws)
		}
	}
	if strings.Contains(ws, "hunter6") {
		t.Errorf("a warning quotes the password: %q", ws)
	}

	t.Setenv("TOLLGATE_KAFKA_TLS", "true")
	t.Setenv("TOLLGATE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
	t.Setenv("TOLLGATE_KAFKA_SASL_USERNAME", "svc")
	t.Setenv("TOLLGATE_KAFKA_SASL_PASSWORD", "from-env")
	cfg = writeConfig(t, "")
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	if ws := cfg.Warnings(); slices.ContainsFunc(ws, func(w string) bool { return strings.Contains(w, "kafka") }) {
		t.Errorf("warnings %q: nothing about Kafka was expected with the password from the environment and TLS on", ws)
	}
	kc, err := cfg.Services.kafkaCluster()
	if err != nil || kc.sec.TLS == nil || kc.sec.SASL == nil || kc.sec.SASL.Name() != "SCRAM-SHA-256" {
		t.Fatalf("kafkaCluster = %+v, %v; want TLS and SCRAM-SHA-256 from the environment", kc.sec, err)
	}

	// An override that cannot be read fails the load, for every command
	// (those that do not validate too), and never turns TLS off.
	t.Setenv("TOLLGATE_KAFKA_TLS", "sometimes")
	t.Setenv("TOLLGATE_REDIS_TLS", "yes")
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("services:\n  redis_tls: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = LoadConfig(p)
	for _, want := range []string{`TOLLGATE_KAFKA_TLS: "sometimes" is not true or false`, `TOLLGATE_REDIS_TLS: "yes" is not true or false`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("LoadConfig = %v; want it to say %s", err, want)
		}
	}
	if strings.Contains(err.Error(), "TLS is off") {
		t.Fatalf("LoadConfig = %v: an unreadable override turned TLS off", err)
	}
}
