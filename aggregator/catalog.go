package aggregator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tollgate-dev/tollgate/meter"
)

// Domain errors the usage and admin APIs map to HTTP.
var (
	ErrConflict = errors.New("conflict")
	ErrInvalid  = errors.New("invalid")
	ErrNotFound = errors.New("not found")
)

// MeterStore keeps meters defined through the admin API.
type MeterStore interface {
	List(ctx context.Context) ([]meter.Meter, error)
	// Create stores m; created is false when an identical meter exists.
	Create(ctx context.Context, m meter.Meter) (created bool, err error)
}

// Catalog is the meters in force: those of the configuration file plus
// those created through the admin API, re-read every refresh interval so
// that every ingest process picks up a new meter within that time.
type Catalog struct {
	config  []meter.Meter
	store   MeterStore
	refresh time.Duration
	now     func() time.Time

	mu     sync.Mutex
	cached *meter.Set
	at     time.Time
}

var _ MeterSource = (*Catalog)(nil)

// NewCatalog validates the configured meters; store may be nil.
func NewCatalog(config []meter.Meter, store MeterStore, refresh time.Duration) (*Catalog, error) {
	if _, err := meter.NewSet(config...); err != nil {
		return nil, err
	}
	return &Catalog{config: config, store: store, refresh: refresh, now: time.Now}, nil
}

// Meters returns every meter in force, in key order.
func (c *Catalog) Meters(ctx context.Context) ([]meter.Meter, error) {
	s, err := c.set(ctx)
	if err != nil {
		return nil, err
	}
	return s.All(), nil
}

// Get returns one meter.
func (c *Catalog) Get(ctx context.Context, key string) (meter.Meter, error) {
	s, err := c.set(ctx)
	if err != nil {
		return meter.Meter{}, err
	}
	m, ok := s.Get(key)
	if !ok {
		return meter.Meter{}, errors.Join(ErrNotFound, fmt.Errorf("no meter %q", key))
	}
	return m, nil
}

func (c *Catalog) set(ctx context.Context) (*meter.Set, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cached != nil && c.now().Sub(c.at) < c.refresh {
		return c.cached, nil
	}
	all := append([]meter.Meter(nil), c.config...)
	if c.store != nil {
		stored, err := c.store.List(ctx)
		if err != nil {
			if c.cached != nil {
				// Keep counting with the meters we know; retry next time.
				return c.cached, nil
			}
			return nil, err
		}
		inConfig := map[string]bool{}
		for _, m := range c.config {
			inConfig[m.Key] = true
		}
		for _, m := range stored {
			if !inConfig[m.Key] {
				all = append(all, m)
			}
		}
	}
	s, err := meter.NewSet(all...)
	if err != nil {
		return nil, fmt.Errorf("meters: %w", err)
	}
	c.cached, c.at = s, c.now()
	return s, nil
}

// Create adds a meter through the store. A key used by the configuration
// file is a conflict.
func (c *Catalog) Create(ctx context.Context, m meter.Meter) (bool, error) {
	if err := m.Validate(); err != nil {
		return false, errors.Join(ErrInvalid, err)
	}
	for _, cm := range c.config {
		if cm.Key == m.Key {
			if meter.Equal(cm, m) {
				return false, nil
			}
			return false, errors.Join(ErrConflict, fmt.Errorf("meter %q is defined in the configuration file", m.Key))
		}
	}
	if c.store == nil {
		return false, errors.New("no meter store configured")
	}
	created, err := c.store.Create(ctx, m)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	c.cached = nil
	c.mu.Unlock()
	return created, nil
}
