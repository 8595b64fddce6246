// Package edge authenticates every API call, forwards it to the operator's
// upstream and emits one usage event per call. Storage and transport live in
// sub-packages (edge/postgres, edge/kafka); this package holds the rules.
package edge

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// Key is a stored API key: everything the edge needs to decide a call,
// and nothing that would reveal the secret.
type Key struct {
	ID            string
	AccountID     string
	Environment   schemas.Environment
	Kind          KeyKind
	DisplayPrefix string
	Hash          []byte
	Scopes        []string
	ExpiresAt     *time.Time
	RevokedAt     *time.Time
}

// Usable reports why a key may not be used at now, or nil when it may.
func (k *Key) Usable(now time.Time) error {
	if k.RevokedAt != nil && !now.Before(*k.RevokedAt) {
		return ErrKeyRevoked
	}
	if k.ExpiresAt != nil && !now.Before(*k.ExpiresAt) {
		return ErrKeyExpired
	}
	return nil
}

// Domain errors, mapped to HTTP in one place (errors.go).
var (
	ErrKeyNotFound = errors.New("api key not found")
	ErrKeyRevoked  = errors.New("api key revoked")
	ErrKeyExpired  = errors.New("api key expired")
	ErrNoKey       = errors.New("no api key presented")
)

// KeyStore finds keys by the SHA-256 of their secret.
type KeyStore interface {
	KeyByHash(ctx context.Context, hash [32]byte) (Key, error)
}

// Emitter accepts usage events for delivery. Emit must not block the
// response path: an implementation buffers, and accounts for every event it
// accepts (delivered, spooled, or reported as lost).
type Emitter interface {
	Emit(ev schemas.Event)
}

// Config is the edge's configuration.
type Config struct {
	// Listen is the address the API listens on, e.g. "127.0.0.1:8080".
	Listen string `yaml:"listen"`
	// Upstream is the operator's API for live keys.
	Upstream string `yaml:"upstream"`
	// SandboxUpstream serves test-mode keys; empty means Upstream.
	SandboxUpstream string `yaml:"sandbox_upstream"`
	// UpstreamTimeout bounds one proxied call.
	UpstreamTimeout time.Duration `yaml:"upstream_timeout"`
	// EventType is the type stamped on call events.
	EventType string `yaml:"event_type"`
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8080"
	}
	if c.UpstreamTimeout == 0 {
		c.UpstreamTimeout = 30 * time.Second
	}
	if c.EventType == "" {
		c.EventType = "api_call"
	}
}

// Validate reports every problem with the configuration at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("edge.listen: required"))
	}
	for name, u := range map[string]string{"edge.upstream": c.Upstream, "edge.sandbox_upstream": c.SandboxUpstream} {
		if u == "" && name == "edge.sandbox_upstream" {
			continue
		}
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			errs = append(errs, fmt.Errorf("%s: want an http(s) URL, got %q", name, u))
		}
	}
	if c.UpstreamTimeout < 0 {
		errs = append(errs, errors.New("edge.upstream_timeout: negative"))
	}
	return errors.Join(errs...)
}
