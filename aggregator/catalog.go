package aggregator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
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
//
// A stored meter this version's rules refuse (one created under an older,
// looser rule) is left out, logged once and listed by Refused, rather than
// failing the whole catalog: that would stop every meter's rollups, and
// every usage answer, for one meter nobody can bill (plans price only the
// configuration's meters).
type Catalog struct {
	config  []meter.Meter
	store   MeterStore
	refresh time.Duration
	log     *slog.Logger
	now     func() time.Time

	// fresh, when set, has a load that is due and fails return the error
	// rather than the cached meters (RequireFresh).
	fresh bool

	mu      sync.Mutex
	cached  *meter.Set
	refused []RefusedMeter
	logged  map[RefusedMeter]bool
	at      time.Time
}

// RefusedMeter is a stored meter left out of the catalog, and why.
type RefusedMeter struct {
	Key    string `json:"key"`
	Reason string `json:"reason"`
}

// UndecodableMeters is a MeterStore's error naming stored meters whose
// definitions it could not read; the meters it returns with it are the
// others. The catalog leaves them out as it leaves out meters this version
// refuses, rather than failing every meter for them.
type UndecodableMeters []RefusedMeter

func (u UndecodableMeters) Error() string {
	keys := make([]string, len(u))
	for i, r := range u {
		keys[i] = r.Key
	}
	return fmt.Sprintf("stored meters whose definitions do not decode: %s", strings.Join(keys, ", "))
}

var _ MeterSource = (*Catalog)(nil)

// NewCatalog validates the configured meters; store may be nil.
func NewCatalog(config []meter.Meter, store MeterStore, refresh time.Duration, log *slog.Logger) (*Catalog, error) {
	if _, err := meter.NewSet(config...); err != nil {
		return nil, err
	}
	return &Catalog{config: config, store: store, refresh: refresh, log: log, now: time.Now,
		logged: map[RefusedMeter]bool{}}, nil
}

// RequireFresh has every read after the refresh interval fail while the
// stored meters cannot be read, rather than answer with the meters loaded
// before. Ingest's rollups need it: a new meter's backfill takes every raw
// event landed once every ingest process has had one refresh interval to
// pick the meter up, so a process rolling up with an older list past that
// (its Postgres out of reach) would leave the events it lands then out of
// the new meter's rollups for good. The usage API serves from what it has.
// Call it before the catalog is used.
func (c *Catalog) RequireFresh() { c.fresh = true }

// Refused returns the stored meters left out of the catalog at its last
// load, in key order.
func (c *Catalog) Refused(ctx context.Context) ([]RefusedMeter, error) {
	if _, err := c.set(ctx); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]RefusedMeter(nil), c.refused...), nil
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
		var undecodable UndecodableMeters
		if errors.As(err, &undecodable) {
			err = nil
		}
		if err != nil {
			if c.cached != nil && !c.fresh {
				// Keep serving with the meters we know; retry next time.
				return c.cached, nil
			}
			return nil, err
		}
		inConfig := map[string]bool{}
		for _, m := range c.config {
			inConfig[m.Key] = true
		}
		var refused []RefusedMeter
		for _, r := range undecodable {
			if inConfig[r.Key] {
				continue
			}
			refused = append(refused, r)
			if !c.logged[r] {
				c.logged[r] = true
				c.log.Error("stored meter left out: its definition does not decode, so it is not rolled up or served; remove it from the meters table and create it again",
					"meter", r.Key, "reason", r.Reason)
			}
		}
		for _, m := range stored {
			if inConfig[m.Key] {
				continue
			}
			if err := m.Validate(); err != nil {
				r := RefusedMeter{Key: m.Key, Reason: err.Error()}
				refused = append(refused, r)
				if !c.logged[r] {
					c.logged[r] = true
					c.log.Error("stored meter left out: this version refuses it, so it is not rolled up or served; remove it from the meters table and create it again within the rules",
						"meter", m.Key, "reason", r.Reason)
				}
				continue
			}
			all = append(all, m)
		}
		c.refused = refused
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
