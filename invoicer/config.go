package invoicer

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/redact"
)

// Config is the invoicer's section of the configuration file. The meters
// plans price are the configuration's top-level meters, shared with the
// aggregator, so invoices and dashboards count the same things.
type Config struct {
	// Listen is the invoice API's address.
	Listen string `yaml:"listen"`
	// MetricsListen, when set, serves Prometheus /metrics (with /healthz
	// and /readyz) on an address of its own, never the invoice API's.
	MetricsListen string `yaml:"metrics_listen"`
	// Interval is how often due periods are closed and Stripe is synced.
	Interval time.Duration `yaml:"interval"`
	// Grace is how far the usage watermark must pass a period's end before
	// the period is closed.
	Grace time.Duration `yaml:"grace"`
	// LookbackMonths bounds how many past periods are considered.
	LookbackMonths int          `yaml:"lookback_months"`
	Stripe         StripeConfig `yaml:"stripe"`
	// TrustedProxies are the addresses and CIDR ranges of the proxies in
	// front of the invoice API (the dashboard, a load balancer) whose
	// X-Forwarded-For it believes for the audit log's remote address.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// StripeConfig says how to reach Stripe. Without an API key invoices stay
// in the ledger only.
type StripeConfig struct {
	// APIKey is a secret (sk_…) or restricted (rk_…) key; set it with
	// TOLLGATE_STRIPE_API_KEY rather than in the file.
	APIKey string `yaml:"api_key"`
	// APIURL overrides Stripe's API URL (stripe-mock, a test fake).
	APIURL string `yaml:"api_url"`
	// WebhookSecret is the endpoint's signing secret (whsec_…);
	// TOLLGATE_STRIPE_WEBHOOK_SECRET.
	WebhookSecret string `yaml:"webhook_secret"`
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if len(c.TrustedProxies) == 0 {
		c.TrustedProxies = nil // written [] or left out: none
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8082"
	}
	if c.Interval == 0 {
		c.Interval = time.Minute
	}
	if c.Grace == 0 {
		c.Grace = time.Hour
	}
	if c.LookbackMonths == 0 {
		c.LookbackMonths = 12
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("invoicer.listen: %v", err))
	}
	if c.Interval <= 0 {
		errs = append(errs, errors.New("invoicer.interval: must be positive"))
	}
	if c.Grace < 0 {
		errs = append(errs, errors.New("invoicer.grace: negative"))
	}
	if c.LookbackMonths < 2 {
		// With one month, what an old zone's last invoice leaves of the
		// month before a zone change lies outside every close's view.
		errs = append(errs, errors.New("invoicer.lookback_months: must be at least 2"))
	}
	if k := c.Stripe.APIKey; k != "" && !strings.HasPrefix(k, "sk_") && !strings.HasPrefix(k, "rk_") {
		errs = append(errs, errors.New("invoicer.stripe.api_key: must be a secret (sk_) or restricted (rk_) key"))
	}
	if a := c.Stripe.APIURL; a != "" {
		if u, err := url.Parse(a); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || redact.HasUserInfo(a) || u.RawQuery != "" {
			// Every Stripe call would fail, each pass only logging it.
			errs = append(errs, fmt.Errorf("invoicer.stripe.api_url: want an http(s) URL with a host and no credentials (http://127.0.0.1:12111, say), got %q", redact.URLAndQuery(a)))
		}
	}
	if w := c.Stripe.WebhookSecret; w != "" && !strings.HasPrefix(w, "whsec_") {
		errs = append(errs, errors.New("invoicer.stripe.webhook_secret: must start with whsec_"))
	}
	if _, err := edge.ParseTrustedProxies("invoicer.trusted_proxies", c.TrustedProxies); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
