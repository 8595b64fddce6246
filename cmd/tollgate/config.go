package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"gopkg.in/yaml.v3"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/internal/redact"
	"github.com/tollgate-dev/tollgate/internal/tlsclient"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/meter"
)

// Services says where the backing services are.
type Services struct {
	PostgresURL        string `yaml:"postgres_url"`
	ClickHouseAddr     string `yaml:"clickhouse_addr"`
	ClickHouseDatabase string `yaml:"clickhouse_database"`
	// ClickHouseUser and ClickHousePassword log in to ClickHouse (default:
	// the user "default", no password). The user needs to create the
	// database and its tables, as Tollgate applies its schema on start.
	ClickHouseUser     string `yaml:"clickhouse_user"`
	ClickHousePassword string `yaml:"clickhouse_password"`
	// ClickHouseTLS reaches ClickHouse's secure native port (9440 on a
	// stock server) over TLS, checking its certificate against
	// ClickHouseTLSCAFile (the system's roots when empty), with the same
	// client certificate and server name settings as Kafka's.
	ClickHouseTLS           bool     `yaml:"clickhouse_tls"`
	ClickHouseTLSCAFile     string   `yaml:"clickhouse_tls_ca_file"`
	ClickHouseTLSCertFile   string   `yaml:"clickhouse_tls_cert_file"`
	ClickHouseTLSKeyFile    string   `yaml:"clickhouse_tls_key_file"`
	ClickHouseTLSServerName string   `yaml:"clickhouse_tls_server_name"`
	KafkaBrokers            []string `yaml:"kafka_brokers"`
	// KafkaTLS encrypts every connection to the brokers, checking their
	// certificates against KafkaTLSCAFile (the system's roots when
	// empty); KafkaTLSCertFile and KafkaTLSKeyFile are a client
	// certificate for brokers that require one; KafkaTLSServerName is the
	// name the brokers' certificates carry when it is not the host dialed.
	KafkaTLS           bool   `yaml:"kafka_tls"`
	KafkaTLSCAFile     string `yaml:"kafka_tls_ca_file"`
	KafkaTLSCertFile   string `yaml:"kafka_tls_cert_file"`
	KafkaTLSKeyFile    string `yaml:"kafka_tls_key_file"`
	KafkaTLSServerName string `yaml:"kafka_tls_server_name"`
	// KafkaSASLMechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; none
	// when empty) authenticates to the brokers as KafkaSASLUsername with
	// KafkaSASLPassword.
	KafkaSASLMechanism string `yaml:"kafka_sasl_mechanism"`
	KafkaSASLUsername  string `yaml:"kafka_sasl_username"`
	KafkaSASLPassword  string `yaml:"kafka_sasl_password"`
	RedisAddr          string `yaml:"redis_addr"`
	// RedisUsername and RedisPassword authenticate to Redis (AUTH; a
	// username is Redis 6's ACL user, none the default user).
	RedisUsername string `yaml:"redis_username"`
	RedisPassword string `yaml:"redis_password"`
	// RedisTLS reaches Redis over TLS (its tls-port), as the ClickHouse
	// settings say.
	RedisTLS           bool   `yaml:"redis_tls"`
	RedisTLSCAFile     string `yaml:"redis_tls_ca_file"`
	RedisTLSCertFile   string `yaml:"redis_tls_cert_file"`
	RedisTLSKeyFile    string `yaml:"redis_tls_key_file"`
	RedisTLSServerName string `yaml:"redis_tls_server_name"`
}

// Config is the whole configuration file; each component reads its section.
type Config struct {
	Services Services        `yaml:"services"`
	Edge     edge.Config     `yaml:"edge"`
	Ingest   ingest.Config   `yaml:"ingest"`
	Invoicer invoicer.Config `yaml:"invoicer"`
	// Aggregator is the usage API and meters admin API.
	Aggregator aggregator.Config `yaml:"aggregator"`
	// Meters are the operator's meters (default: api_calls); more can be
	// created through the aggregator's admin API.
	Meters []meter.Meter `yaml:"meters"`
	// Dashboard is the customer dashboard (static pages + API forwarding).
	Dashboard DashboardConfig `yaml:"dashboard"`

	// secretsInFile are the settings holding a secret that the file
	// itself gave (Warnings).
	secretsInFile []string
}

// LoadConfig reads path (optional: "" means defaults only), then applies
// environment overrides and defaults. It does not validate. A file with
// nothing but comments (or nothing at all) means every default, as no file
// does; a file of more than one YAML document is refused, since only one
// would be read.
func LoadConfig(path string) (Config, error) {
	var c Config
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("read config: %w", err)
		}
		if err := decodeConfig(b, &c); err != nil {
			return c, fmt.Errorf("parse config %s: %w", path, err)
		}
		c.secretsInFile = c.fileSecrets()
	}
	if err := c.applyEnv(); err != nil {
		return c, err
	}
	c.defaults()
	return c, nil
}

// decodeConfig reads the one YAML document of b into c, strictly.
func decodeConfig(b []byte, c *Config) error {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // empty, or comments only
		}
		return withoutAnchorName(err)
	}
	for {
		var doc yaml.Node
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return withoutAnchorName(err)
		}
		// A trailing "---" with nothing after it is harmless.
		if len(doc.Content) > 0 && doc.Content[0].Tag != "!!null" {
			return fmt.Errorf("line %d: a second YAML document (after a \"---\" line); only one is read, so put every section in one document", doc.Content[0].Line)
		}
	}
}

// withoutAnchorName is a YAML parse error without the name of an unknown
// anchor it quotes: an unquoted value starting with "*" (a password, say)
// reads as an alias, and the error printed the rest of the value.
func withoutAnchorName(err error) error {
	msg := err.Error()
	i := strings.Index(msg, "unknown anchor '")
	if i < 0 {
		return err
	}
	line := ""
	if j := strings.Index(msg, "line "); j >= 0 && j < i {
		line = msg[j:i]
	}
	return fmt.Errorf("yaml: %sa value starting with * reads as an alias of an anchor that is not there; quote the value", line)
}

// eventTripMargin is the least edge.max_event_age stays under
// ingest.max_lateness.
const eventTripMargin = 10 * time.Minute

// envStrings are the environment variables that override a setting of the
// file, each with the setting it overrides. TOLLGATE_KAFKA_BROKERS (a
// comma-separated list) and TOLLGATE_CONFIG (the file itself) are the others
// every command reads.
func (c *Config) envStrings() map[string]*string {
	return map[string]*string{
		"TOLLGATE_POSTGRES_URL":                  &c.Services.PostgresURL,
		"TOLLGATE_CLICKHOUSE_ADDR":               &c.Services.ClickHouseAddr,
		"TOLLGATE_CLICKHOUSE_DATABASE":           &c.Services.ClickHouseDatabase,
		"TOLLGATE_CLICKHOUSE_USER":               &c.Services.ClickHouseUser,
		"TOLLGATE_CLICKHOUSE_PASSWORD":           &c.Services.ClickHousePassword,
		"TOLLGATE_REDIS_ADDR":                    &c.Services.RedisAddr,
		"TOLLGATE_REDIS_USERNAME":                &c.Services.RedisUsername,
		"TOLLGATE_REDIS_PASSWORD":                &c.Services.RedisPassword,
		"TOLLGATE_CLICKHOUSE_TLS_CA_FILE":        &c.Services.ClickHouseTLSCAFile,
		"TOLLGATE_CLICKHOUSE_TLS_CERT_FILE":      &c.Services.ClickHouseTLSCertFile,
		"TOLLGATE_CLICKHOUSE_TLS_KEY_FILE":       &c.Services.ClickHouseTLSKeyFile,
		"TOLLGATE_CLICKHOUSE_TLS_SERVER_NAME":    &c.Services.ClickHouseTLSServerName,
		"TOLLGATE_REDIS_TLS_CA_FILE":             &c.Services.RedisTLSCAFile,
		"TOLLGATE_REDIS_TLS_CERT_FILE":           &c.Services.RedisTLSCertFile,
		"TOLLGATE_REDIS_TLS_KEY_FILE":            &c.Services.RedisTLSKeyFile,
		"TOLLGATE_REDIS_TLS_SERVER_NAME":         &c.Services.RedisTLSServerName,
		"TOLLGATE_KAFKA_TLS_CA_FILE":             &c.Services.KafkaTLSCAFile,
		"TOLLGATE_KAFKA_TLS_CERT_FILE":           &c.Services.KafkaTLSCertFile,
		"TOLLGATE_KAFKA_TLS_KEY_FILE":            &c.Services.KafkaTLSKeyFile,
		"TOLLGATE_KAFKA_TLS_SERVER_NAME":         &c.Services.KafkaTLSServerName,
		"TOLLGATE_KAFKA_SASL_MECHANISM":          &c.Services.KafkaSASLMechanism,
		"TOLLGATE_KAFKA_SASL_USERNAME":           &c.Services.KafkaSASLUsername,
		"TOLLGATE_KAFKA_SASL_PASSWORD":           &c.Services.KafkaSASLPassword,
		"TOLLGATE_EDGE_LISTEN":                   &c.Edge.Listen,
		"TOLLGATE_DASHBOARD_LISTEN":              &c.Dashboard.Listen,
		"TOLLGATE_EDGE_UPSTREAM":                 &c.Edge.Upstream,
		"TOLLGATE_INVOICER_LISTEN":               &c.Invoicer.Listen,
		"TOLLGATE_INVOICER_METRICS_LISTEN":       &c.Invoicer.MetricsListen,
		"TOLLGATE_STRIPE_API_KEY":                &c.Invoicer.Stripe.APIKey,
		"TOLLGATE_STRIPE_API_URL":                &c.Invoicer.Stripe.APIURL,
		"TOLLGATE_STRIPE_WEBHOOK_SECRET":         &c.Invoicer.Stripe.WebhookSecret,
		"TOLLGATE_EDGE_SANDBOX_UPSTREAM":         &c.Edge.SandboxUpstream,
		"TOLLGATE_EDGE_ADMIN_LISTEN":             &c.Edge.AdminListen,
		"TOLLGATE_EDGE_ADMIN_TOKEN_SHA256":       &c.Edge.AdminTokenSHA256,
		"TOLLGATE_EDGE_SPOOL_DIR":                &c.Edge.SpoolDir,
		"TOLLGATE_AGGREGATOR_LISTEN":             &c.Aggregator.Listen,
		"TOLLGATE_AGGREGATOR_METRICS_LISTEN":     &c.Aggregator.MetricsListen,
		"TOLLGATE_AGGREGATOR_ADMIN_TOKEN_SHA256": &c.Aggregator.AdminTokenSHA256,
		"TOLLGATE_INGEST_METRICS_LISTEN":         &c.Ingest.MetricsListen,
	}
}

// applyEnv applies the environment's overrides; one it cannot read is an
// error, and the setting keeps what the file gave it.
func (c *Config) applyEnv() error {
	for name, dst := range c.envStrings() {
		if v := os.Getenv(name); v != "" {
			*dst = v
		}
	}
	if v := os.Getenv("TOLLGATE_KAFKA_BROKERS"); v != "" {
		c.Services.KafkaBrokers = strings.Split(v, ",")
	}
	var bad []error
	for name, dst := range map[string]*bool{
		"TOLLGATE_KAFKA_TLS":      &c.Services.KafkaTLS,
		"TOLLGATE_CLICKHOUSE_TLS": &c.Services.ClickHouseTLS,
		"TOLLGATE_REDIS_TLS":      &c.Services.RedisTLS,
	} {
		if v := os.Getenv(name); v != "" {
			on, err := strconv.ParseBool(v)
			if err != nil {
				bad = append(bad, fmt.Errorf("%s: %q is not true or false", name, v))
				continue
			}
			*dst = on
		}
	}
	slices.SortFunc(bad, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return errors.Join(bad...)
}

// clickHouseTLS is the TLS configuration for ClickHouse, nil for none.
func (s Services) clickHouseTLS() (*tls.Config, error) {
	return tlsclient.Files{Enabled: s.ClickHouseTLS, CAFile: s.ClickHouseTLSCAFile, CertFile: s.ClickHouseTLSCertFile,
		KeyFile: s.ClickHouseTLSKeyFile, ServerName: s.ClickHouseTLSServerName}.Config("services.clickhouse_")
}

// redisTLS is the TLS configuration for Redis, nil for none.
func (s Services) redisTLS() (*tls.Config, error) {
	return tlsclient.Files{Enabled: s.RedisTLS, CAFile: s.RedisTLSCAFile, CertFile: s.RedisTLSCertFile,
		KeyFile: s.RedisTLSKeyFile, ServerName: s.RedisTLSServerName}.Config("services.redis_")
}

// kafkaSettings are the brokers' TLS and SASL settings.
func (s Services) kafkaSettings() kafkaconn.Settings {
	return kafkaconn.Settings{TLS: s.KafkaTLS, CAFile: s.KafkaTLSCAFile, CertFile: s.KafkaTLSCertFile, KeyFile: s.KafkaTLSKeyFile,
		ServerName: s.KafkaTLSServerName, SASLMechanism: s.KafkaSASLMechanism, SASLUsername: s.KafkaSASLUsername, SASLPassword: s.KafkaSASLPassword}
}

// kafkaSecurity is how every Kafka client reaches the brokers. Validate
// has reported what is wrong with the settings; a command that starts
// without validating gets the same error here.
func (s Services) kafkaSecurity() (kafkaconn.Security, error) {
	return s.kafkaSettings().Build("services.kafka_")
}

func (c *Config) defaults() {
	if len(c.Dashboard.TrustedProxies) == 0 {
		c.Dashboard.TrustedProxies = nil // written [] or left out: none
	}
	s := &c.Services
	if s.PostgresURL == "" {
		s.PostgresURL = "postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable"
	}
	if s.ClickHouseAddr == "" {
		s.ClickHouseAddr = "127.0.0.1:19000"
	}
	if s.ClickHouseDatabase == "" {
		s.ClickHouseDatabase = "tollgate"
	}
	if s.ClickHouseUser == "" {
		s.ClickHouseUser = "default"
	}
	if len(s.KafkaBrokers) == 0 {
		s.KafkaBrokers = []string{"127.0.0.1:19092"}
	}
	if s.RedisAddr == "" {
		s.RedisAddr = "127.0.0.1:16379"
	}
	c.Ingest.Defaults()
	if c.Edge.MaxEventAge == 0 {
		// A day under the lateness ingest counts, as edge's own default
		// is; half of it when that is two days or less, and never under
		// the hour the edge takes at least (nor over the lateness).
		l := c.Ingest.MaxLateness
		c.Edge.MaxEventAge = max(min(l, time.Hour), l-min(24*time.Hour, l/2))
	}
	c.Edge.Defaults()
	c.Invoicer.Defaults()
	c.Aggregator.Defaults()
	if len(c.Meters) == 0 {
		c.Meters = []meter.Meter{meter.Default()}
	}
}

// fileSecrets names the settings of c that hold a secret, each with the
// environment variable that should give it instead: a file is easily
// committed, copied or shared.
func (c *Config) fileSecrets() []string {
	var out []string
	for _, s := range []struct {
		name, env, value string
	}{
		{"services.clickhouse_password", "TOLLGATE_CLICKHOUSE_PASSWORD", c.Services.ClickHousePassword},
		{"services.redis_password", "TOLLGATE_REDIS_PASSWORD", c.Services.RedisPassword},
		{"services.kafka_sasl_password", "TOLLGATE_KAFKA_SASL_PASSWORD", c.Services.KafkaSASLPassword},
		{"invoicer.stripe.api_key", "TOLLGATE_STRIPE_API_KEY", c.Invoicer.Stripe.APIKey},
		{"invoicer.stripe.webhook_secret", "TOLLGATE_STRIPE_WEBHOOK_SECRET", c.Invoicer.Stripe.WebhookSecret},
	} {
		if s.value != "" {
			out = append(out, fmt.Sprintf("%s is written in the configuration file: give secrets through the environment (%s) instead, as a file is easily committed or shared", s.name, s.env))
		}
	}
	if postgresPassword(c.Services.PostgresURL) {
		out = append(out, "services.postgres_url holds a password in the configuration file: give the URL through the environment (TOLLGATE_POSTGRES_URL), or the password through PGPASSWORD or a .pgpass file, instead")
	}
	return out
}

// postgresPassword reports whether conn, a connection string in either
// form Postgres takes, carries a password: in a URL's user part or its
// password parameter, or as a password key.
func postgresPassword(conn string) bool {
	rest, isURL := strings.CutPrefix(conn, "postgres://")
	if !isURL {
		rest, isURL = strings.CutPrefix(conn, "postgresql://")
	}
	if !isURL {
		return keyValuePassword(conn) != ""
	}
	// As the driver reads a URL: the user part runs to the first "@"
	// before any "/" (a password may hold "#" or "?"), the host on to a
	// "/" or a "?", and the parameters follow the first "?" after the
	// user part, with or without a path.
	slash := strings.IndexByte(rest, '/')
	if slash < 0 {
		slash = len(rest)
	}
	if at := strings.IndexByte(rest[:slash], '@'); at >= 0 {
		if _, pw, ok := strings.Cut(rest[:at], ":"); ok && pw != "" {
			return true
		}
		rest = rest[at+1:]
	}
	if _, query, ok := strings.Cut(rest, "?"); ok {
		// As the driver splits it: on "&" alone (a ";" is a byte like any
		// other), each key and value unescaped, the last key standing.
		// Raw spaces are trimmed before unescaping, none after.
		pw := ""
		for _, kv := range strings.Split(query, "&") {
			k, v, _ := strings.Cut(kv, "=")
			k, v = strings.Trim(k, " "), strings.Trim(v, " ")
			if u, err := url.PathUnescape(k); err == nil {
				k = u
			}
			if k == "password" {
				if u, err := url.PathUnescape(v); err == nil {
					v = u
				}
				pw = v
			}
		}
		return pw != ""
	}
	return false
}

// keyValuePassword is the last password in conn, key=value pairs read as
// the driver reads them: a value is quoted ('…', backslash escapes) or runs
// to the next space (backslash escapes too).
func keyValuePassword(conn string) string {
	pw := ""
	s := conn
	for {
		s = strings.TrimLeft(s, " \t\n\r\v\f")
		if s == "" {
			return pw
		}
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			return pw
		}
		key := strings.TrimSpace(s[:eq])
		s = strings.TrimLeft(s[eq+1:], " \t\n\r\v\f")
		var val strings.Builder
		if strings.HasPrefix(s, "'") {
			i := 1
			for ; i < len(s) && s[i] != '\''; i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				val.WriteByte(s[i])
			}
			s = s[min(i+1, len(s)):]
		} else {
			i := 0
			for ; i < len(s) && !strings.ContainsRune(" \t\n\r\v\f", rune(s[i])); i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				val.WriteByte(s[i])
			}
			s = s[i:]
		}
		if key == "password" {
			pw = val.String()
		}
	}
}

// Warnings are what a valid configuration may well not mean, for the
// named components (all of them when none is named): check-config prints
// them, and a command that starts a component logs them.
func (c *Config) Warnings(components ...string) []string {
	out := slices.Clone(c.secretsInFile)
	if c.Services.kafkaSettings().PlainSASLInClear() {
		out = append(out, "services.kafka_sasl_mechanism: PLAIN without services.kafka_tls sends the password to the brokers in clear text")
	}
	if len(components) == 0 || slices.Contains(components, "edge") {
		// Meters created through the admin API may still count them, so
		// this is a warning, not a refusal.
		if !slices.ContainsFunc(c.Meters, func(m meter.Meter) bool { return m.EventType == c.Edge.EventType }) {
			out = append(out, fmt.Sprintf("edge.event_type %q: no meter of the configuration counts it, so the edge's calls land in ClickHouse but are in no usage and no invoice unless a meter created through the admin API counts them", c.Edge.EventType))
		}
	}
	return out
}

// Validate reports every problem in the sections the named components use
// (all of them when none is named). Besides each section's own checks, it
// checks what the sections' packages leave to the process that runs them:
// every address it listens on or dials, the ClickHouse database name, the
// plans' monthly quotas, the invoicer's shortest interval, and the meters
// for every component that counts or bills with them.
func (c *Config) Validate(components ...string) error {
	want := map[string]bool{}
	for _, n := range components {
		want[n] = true
	}
	all := len(components) == 0
	var errs []error
	if _, err := c.Services.kafkaSecurity(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.Services.clickHouseTLS(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.Services.redisTLS(); err != nil {
		errs = append(errs, err)
	}
	if c.Services.PostgresURL == "" {
		errs = append(errs, errors.New("services.postgres_url: required"))
	} else if err := checkPostgresURL(c.Services.PostgresURL); err != nil {
		errs = append(errs, err)
	}
	if c.Services.ClickHouseDatabase == "" {
		errs = append(errs, errors.New("services.clickhouse_database: required"))
	} else if !chIdent.MatchString(c.Services.ClickHouseDatabase) {
		errs = append(errs, fmt.Errorf("services.clickhouse_database: %q: letters, digits and _ only, not starting with a digit", c.Services.ClickHouseDatabase))
	}
	errs = append(errs, checkDial("services.clickhouse_addr", c.Services.ClickHouseAddr), checkDial("services.redis_addr", c.Services.RedisAddr))
	for i, b := range c.Services.KafkaBrokers {
		errs = append(errs, checkDial(fmt.Sprintf("services.kafka_brokers[%d]", i), b))
	}
	if all || want["edge"] {
		errs = append(errs, c.Edge.Validate(),
			checkListen("edge.listen", c.Edge.Listen), checkListen("edge.admin_listen", c.Edge.AdminListen))
		// The edge produces to the usage topic, ingest's to read; when
		// ingest's section is checked too, it names the topic once.
		if !all && !want["ingest"] {
			errs = append(errs, ingest.CheckTopic("ingest.topic", c.Ingest.Topic))
		}
		for _, id := range slices.Sorted(maps.Keys(c.Edge.Plans)) {
			if q := c.Edge.Plans[id].Limits.MonthlyRequests; q != nil && *q < 0 {
				errs = append(errs, fmt.Errorf("edge.plans.%s.limits.monthly_requests: negative (%d); leave it out for no quota", id, *q))
			}
		}
	}
	if all || want["ingest"] {
		errs = append(errs, c.Ingest.Validate(), checkListen("ingest.metrics_listen", c.Ingest.MetricsListen))
	}
	if (all || want["edge"]) && c.Edge.MaxEventAge > c.Ingest.MaxLateness-eventTripMargin {
		// Ingest measures lateness from the Kafka record's time, which
		// comes after the edge's check (the linger, the write, a spell in
		// the spool): an event taken at the edge's limit with no margin
		// was set aside as too late, never counted, though it was accepted.
		errs = append(errs, fmt.Errorf("edge.max_event_age (%s) leaves less than %s under ingest.max_lateness (%s): events the edge takes near its limit would not be counted",
			c.Edge.MaxEventAge, eventTripMargin, c.Ingest.MaxLateness))
	}
	if all || want["invoice"] {
		errs = append(errs, c.Invoicer.Validate())
		if _, _, err := net.SplitHostPort(c.Invoicer.Listen); err == nil {
			// A listen address that is not host:port at all is the
			// invoicer's own check.
			errs = append(errs, checkListen("invoicer.listen", c.Invoicer.Listen))
		}
		errs = append(errs, checkListen("invoicer.metrics_listen", c.Invoicer.MetricsListen))
		if c.Invoicer.Interval > 0 && c.Invoicer.Interval < MinInvoicerInterval {
			errs = append(errs, fmt.Errorf("invoicer.interval: at least %s, got %s", MinInvoicerInterval, c.Invoicer.Interval))
		}
	}
	if all || want["ingest"] || want["aggregate"] {
		errs = append(errs, c.Aggregator.Validate(),
			checkListen("aggregator.listen", c.Aggregator.Listen), checkListen("aggregator.metrics_listen", c.Aggregator.MetricsListen))
	}
	// The invoicer prices usage by these meters: a set the aggregator
	// would refuse is not one to bill with.
	if all || want["ingest"] || want["aggregate"] || want["invoice"] {
		if _, err := meter.NewSet(c.Meters...); err != nil {
			errs = append(errs, fmt.Errorf("meters: %w", err))
		}
	}
	if want["dashboard"] && c.Dashboard.Listen == "" {
		// `tollgate all` serves no dashboard without it; `tollgate
		// dashboard` has nothing else to do.
		errs = append(errs, errors.New("dashboard.listen (or TOLLGATE_DASHBOARD_LISTEN): required to run the dashboard"))
	}
	if all || want["dashboard"] {
		errs = append(errs, checkListen("dashboard.listen", c.Dashboard.Listen),
			checkBaseURL("dashboard.usage_api", c.Dashboard.UsageAPI), checkBaseURL("dashboard.invoice_api", c.Dashboard.InvoiceAPI))
		if _, err := edge.ParseTrustedProxies("dashboard.trusted_proxies", c.Dashboard.TrustedProxies); err != nil {
			errs = append(errs, err)
		}
	}
	if all {
		errs = append(errs, c.listenClashes())
	}
	return errors.Join(errs...)
}

// listenClashes reports two components of one process (tollgate all) set
// to listen on one port: the second failed to start only after every
// service had been connected.
func (c *Config) listenClashes() error {
	var errs []error
	type listen struct {
		name, host, port string
		ips              []string
	}
	var seen []listen
	for _, l := range []struct{ name, addr string }{
		{"edge.listen", c.Edge.Listen}, {"edge.admin_listen", c.Edge.AdminListen},
		{"ingest.metrics_listen", c.Ingest.MetricsListen}, {"aggregator.listen", c.Aggregator.Listen},
		{"aggregator.metrics_listen", c.Aggregator.MetricsListen}, {"invoicer.listen", c.Invoicer.Listen},
		{"invoicer.metrics_listen", c.Invoicer.MetricsListen},
		{"dashboard.listen", c.Dashboard.Listen},
	} {
		host, port, err := net.SplitHostPort(l.addr)
		if err != nil || port == "0" || port == "" {
			continue // off, any free port, or reported above
		}
		// One port however it is written (8080 or a service name), and
		// one host however it is named (localhost or 127.0.0.1).
		if n, err := net.LookupPort("tcp", port); err == nil {
			if n == 0 {
				continue
			}
			port = strconv.Itoa(n)
		}
		ips := listenIPs(host)
		for _, o := range seen {
			if o.port == port && (o.host == host || anyHost(o.host) || anyHost(host) || slices.ContainsFunc(ips, func(ip string) bool { return slices.Contains(o.ips, ip) })) {
				errs = append(errs, fmt.Errorf("%s: %s is also %s's: one process listens on each port once", l.name, l.addr, o.name))
			}
		}
		seen = append(seen, listen{l.name, host, port, ips})
	}
	return errors.Join(errs...)
}

// listenIPs are the addresses a listen on host binds: itself when it is
// an IP, else the one of the name's addresses that Go's listener takes
// (the first IPv4 one, else the first), none when the name does not
// resolve.
func listenIPs(host string) []string {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []string{ip.Unmap().String()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(addrs) == 0 {
		return nil
	}
	for _, a := range addrs {
		if a.Unmap().Is4() {
			return []string{a.Unmap().String()}
		}
	}
	return []string{addrs[0].String()}
}

// anyHost reports whether a listen host means every interface.
func anyHost(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }

// MinInvoicerInterval is the shortest invoicer.interval: each pass reads
// every account's usage and may call Stripe, so a shorter one is a busy
// loop against ClickHouse, Postgres and Stripe rather than a schedule.
const MinInvoicerInterval = time.Second

// checkListen checks an address to listen on: host:port, the host empty
// (every interface), an IP or a name, the port a number (0: any free
// port). Empty is left to the component: it means off, or is required.
func checkListen(name, addr string) error {
	if addr == "" {
		return nil
	}
	if err := checkHostPort(addr); err != nil {
		return fmt.Errorf("%s: want host:port (e.g. 127.0.0.1:8080 or :8080), got %q: %v", name, addr, err)
	}
	return nil
}

// checkDial checks an address to connect to: host:port with a host. A
// URL or DSN given instead (redis://:password@host:6379, as a platform
// hands them out) is refused without quoting its credentials.
func checkDial(name, addr string) error {
	// A connection string holds its password after one of these (Azure's
	// host:6380,password=…; host:6379?password=…): only what comes before
	// is quoted.
	if i := strings.IndexAny(addr, "@,;?# \t"); i >= 0 || strings.Contains(addr, "://") {
		shown := redact.URLAndQuery(addr)
		if j := strings.IndexAny(shown, ",; \t"); j >= 0 {
			shown = shown[:j] + "…"
		}
		return fmt.Errorf("%s: want host:port, got %q, a URL, connection string or address with credentials: give the host and port here, and a password through its own setting",
			name, shown)
	}
	err := checkHostPort(addr)
	if err == nil && strings.HasPrefix(addr, ":") {
		err = errors.New("no host")
	}
	if err != nil {
		return fmt.Errorf("%s: want host:port, got %q: %v", name, addr, err)
	}
	return nil
}

func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			return errors.New(ae.Err)
		}
		return err
	}
	if err := checkPort(port); err != nil {
		return err
	}
	// What Go's resolver takes: IP literals (IPv6 with a zone too) and
	// names, underscores included (container names like project_kafka_1).
	if ip := host; host != "" && !hostName.MatchString(host) {
		if i := strings.IndexByte(ip, '%'); i > 0 {
			ip = ip[:i]
		}
		if net.ParseIP(ip) == nil {
			return fmt.Errorf("host %q is neither an IP address nor a host name", host)
		}
	}
	return nil
}

// checkPort takes a port number or a service name (http, https, …).
func checkPort(port string) error {
	if _, err := strconv.ParseUint(port, 10, 16); err == nil {
		return nil
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("port %q is neither a number from 0 to 65535 nor a known service name", port)
	}
	return nil
}

var hostName = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$`)

// checkBaseURL checks an API base URL the dashboard forwards to: an
// http(s) URL with a host, or host:port (read as http://host:port).
// Empty means the default.
func checkBaseURL(name, v string) error {
	if v == "" {
		return nil
	}
	u, err := url.Parse(httpBase(v))
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // not the URL again, password and all
	}
	if redact.HasUserInfo(httpBase(v)) {
		// Not the parser's reason either: a password holding / ? or #
		// reads as a port, which it would then quote. Nor are credentials
		// sent on: the dashboard forwards the caller's key.
		err = errors.New("credentials in the URL are not sent on")
	}
	if err == nil && strings.Contains(v, "://") && !strings.HasPrefix(v, "http") {
		err = errors.New("not http or https")
	}
	if err == nil && u.Hostname() == "" {
		err = errors.New("no host")
	}
	if err == nil && u.Port() != "" {
		err = checkPort(u.Port())
	}
	if err != nil {
		return fmt.Errorf("%s: want an http(s) URL or host:port, got %q: %v", name, redact.URL(v), err)
	}
	return nil
}

// plainUserInfo reports whether u's user information, if any, ends at the
// only @ in u, with no / ? or # before it.
func plainUserInfo(u string) bool {
	if _, rest, ok := strings.Cut(u, "://"); ok {
		u = rest
	}
	at := strings.IndexByte(u, '@')
	return at < 0 || strings.Count(u, "@") == 1 && !strings.ContainsAny(u[:at], "/?#")
}

// checkPostgresURL refuses a Postgres connection string the driver cannot
// parse, naming it with its password hidden. The driver's own message is
// not passed on: its redaction is best effort, and cut a password holding
// an unencoded "@" at the wrong place, printing the rest of it.
func checkPostgresURL(u string) error {
	// pgxpool's parser: it reads pgx's and the pool's own settings too
	// (default_query_exec_mode, pool_max_conns, …), which the connection
	// parser passes on unread, and whose refusal quotes the whole string.
	if _, err := pgxpool.ParseConfig(u); err != nil {
		// Not even redacted: a string the driver cannot parse cannot be
		// trusted to show where its password is (an unencoded / or @ in
		// it, a password= parameter, a keyword DSN). The host alone, when
		// a URL parser finds one, says which setting is meant.
		where := ""
		// Not when a password may hold an @, or a / ? or # ahead of its
		// @: the parser would read part of it as the host.
		if pu, perr := url.Parse(u); perr == nil && pu.Hostname() != "" && !strings.ContainsAny(pu.Hostname(), "@:/") && plainUserInfo(u) {
			where = " (host " + pu.Hostname() + ")"
		}
		return fmt.Errorf("services.postgres_url%s: not a connection string the driver can parse; it is not shown, as it may hold a password "+
			"(check the host, port and parameters; a password holding @ : / ? # must be percent-encoded)", where)
	}
	return nil
}
