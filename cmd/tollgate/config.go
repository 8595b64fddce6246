package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/meter"
)

// Services says where the backing services are.
type Services struct {
	PostgresURL        string   `yaml:"postgres_url"`
	ClickHouseAddr     string   `yaml:"clickhouse_addr"`
	ClickHouseDatabase string   `yaml:"clickhouse_database"`
	KafkaBrokers       []string `yaml:"kafka_brokers"`
	RedisAddr          string   `yaml:"redis_addr"`
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
}

// LoadConfig reads path (optional: "" means defaults only), then applies
// environment overrides and defaults. It does not validate.
func LoadConfig(path string) (Config, error) {
	var c Config
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("read config: %w", err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(b)))
		dec.KnownFields(true)
		if err := dec.Decode(&c); err != nil {
			return c, fmt.Errorf("parse config %s: %w", path, err)
		}
	}
	c.applyEnv()
	c.defaults()
	return c, nil
}

func (c *Config) applyEnv() {
	set := func(dst *string, name string) {
		if v := os.Getenv(name); v != "" {
			*dst = v
		}
	}
	set(&c.Services.PostgresURL, "TOLLGATE_POSTGRES_URL")
	set(&c.Services.ClickHouseAddr, "TOLLGATE_CLICKHOUSE_ADDR")
	set(&c.Services.ClickHouseDatabase, "TOLLGATE_CLICKHOUSE_DATABASE")
	set(&c.Services.RedisAddr, "TOLLGATE_REDIS_ADDR")
	if v := os.Getenv("TOLLGATE_KAFKA_BROKERS"); v != "" {
		c.Services.KafkaBrokers = strings.Split(v, ",")
	}
	set(&c.Edge.Listen, "TOLLGATE_EDGE_LISTEN")
	set(&c.Dashboard.Listen, "TOLLGATE_DASHBOARD_LISTEN")
	set(&c.Edge.Upstream, "TOLLGATE_EDGE_UPSTREAM")
	set(&c.Invoicer.Listen, "TOLLGATE_INVOICER_LISTEN")
	set(&c.Invoicer.Stripe.APIKey, "TOLLGATE_STRIPE_API_KEY")
	set(&c.Invoicer.Stripe.APIURL, "TOLLGATE_STRIPE_API_URL")
	set(&c.Invoicer.Stripe.WebhookSecret, "TOLLGATE_STRIPE_WEBHOOK_SECRET")
	set(&c.Edge.SandboxUpstream, "TOLLGATE_EDGE_SANDBOX_UPSTREAM")
	set(&c.Edge.AdminListen, "TOLLGATE_EDGE_ADMIN_LISTEN")
	set(&c.Edge.AdminTokenSHA256, "TOLLGATE_EDGE_ADMIN_TOKEN_SHA256")
	set(&c.Edge.SpoolDir, "TOLLGATE_EDGE_SPOOL_DIR")
	set(&c.Aggregator.Listen, "TOLLGATE_AGGREGATOR_LISTEN")
	set(&c.Aggregator.MetricsListen, "TOLLGATE_AGGREGATOR_METRICS_LISTEN")
	set(&c.Aggregator.AdminTokenSHA256, "TOLLGATE_AGGREGATOR_ADMIN_TOKEN_SHA256")
}

func (c *Config) defaults() {
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
	if len(s.KafkaBrokers) == 0 {
		s.KafkaBrokers = []string{"127.0.0.1:19092"}
	}
	if s.RedisAddr == "" {
		s.RedisAddr = "127.0.0.1:16379"
	}
	c.Ingest.Defaults()
	if c.Edge.MaxEventAge == 0 && c.Ingest.MaxLateness > 2*24*time.Hour {
		// A day under the lateness ingest counts, as edge's own default is.
		c.Edge.MaxEventAge = c.Ingest.MaxLateness - 24*time.Hour
	}
	c.Edge.Defaults()
	c.Invoicer.Defaults()
	c.Aggregator.Defaults()
	if len(c.Meters) == 0 {
		c.Meters = []meter.Meter{meter.Default()}
	}
}

// Validate reports every problem in the sections the named components use
// (all of them when none is named).
func (c *Config) Validate(components ...string) error {
	want := map[string]bool{}
	for _, n := range components {
		want[n] = true
	}
	all := len(components) == 0
	var errs []error
	if c.Services.PostgresURL == "" {
		errs = append(errs, errors.New("services.postgres_url: required"))
	}
	if c.Services.ClickHouseDatabase == "" {
		errs = append(errs, errors.New("services.clickhouse_database: required"))
	}
	if all || want["edge"] {
		errs = append(errs, c.Edge.Validate())
	}
	if all || want["ingest"] {
		errs = append(errs, c.Ingest.Validate())
	}
	if (all || want["edge"]) && c.Edge.MaxEventAge > c.Ingest.MaxLateness {
		errs = append(errs, fmt.Errorf("edge.max_event_age (%s) is longer than ingest.max_lateness (%s): events the edge takes would not be counted",
			c.Edge.MaxEventAge, c.Ingest.MaxLateness))
	}
	if all || want["invoice"] {
		errs = append(errs, c.Invoicer.Validate())
	}
	if all || want["ingest"] || want["aggregate"] {
		errs = append(errs, c.Aggregator.Validate())
		if _, err := meter.NewSet(c.Meters...); err != nil {
			errs = append(errs, fmt.Errorf("meters: %w", err))
		}
	}
	return errors.Join(errs...)
}
