package aggregator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// ErrZoneRefused is what a ZoneChecker's error wraps when the store cannot
// compute windows in a time zone.
var ErrZoneRefused = errors.New("time zone refused")

// ZoneChecker tells whether the store that computes windows can compute
// them in a time zone. ClickHouse can refuse a zone Go loads: one its
// tzdata lacks (a zone newer than the server, the right/ zones).
type ZoneChecker interface {
	// CheckZone returns nil when zone can be used, an error wrapping
	// ErrZoneRefused when it cannot, and any other error when it could
	// not tell.
	CheckZone(ctx context.Context, zone string) error
}

// checkedZones is Zones without the zones Go or the store cannot use: an
// account in one is rolled up (and its usage served) in UTC, with a
// warning, as one whose zone does not load at all. One such account must
// not fail the recompute every other account's batches share.
type checkedZones struct {
	zones Zones
	check ZoneChecker
	log   *slog.Logger
	mu    sync.Mutex
	seen  map[string]*zoneAnswer
}

type zoneAnswer struct {
	err    error           // nil when the zone can be used
	warned map[string]bool // accounts warned about
}

func checkZones(zones Zones, check ZoneChecker, log *slog.Logger) *checkedZones {
	if c, ok := zones.(*checkedZones); ok {
		return c
	}
	return &checkedZones{zones: zones, check: check, log: log, seen: map[string]*zoneAnswer{}}
}

// Zones returns the zones of accounts, leaving out (so UTC) those that
// cannot be used.
func (c *checkedZones) Zones(ctx context.Context, accounts []string) (map[string]string, error) {
	zs, err := c.zones.Zones(ctx, accounts)
	if err != nil {
		return nil, err
	}
	byZone := map[string][]string{}
	for a, z := range zs {
		if z != "" && z != "UTC" {
			byZone[z] = append(byZone[z], a)
		}
	}
	for z, as := range byZone {
		a, err := c.answer(ctx, z)
		if err != nil {
			return nil, err
		}
		if a.err == nil {
			continue
		}
		for _, acct := range as {
			delete(zs, acct)
		}
		c.warn(a, z, as)
	}
	return zs, nil
}

// answer tells whether zone can be used. The first answer is kept for the
// life of the process: asked again, a zone's answer could change (the
// server's tzdata updated), and the account's windows would move to
// another grid mid-month with no rebuild, counting its events twice in
// the coarser rows. A check that cannot tell fails, and is asked again.
func (c *checkedZones) answer(ctx context.Context, zone string) (*zoneAnswer, error) {
	c.mu.Lock()
	last := c.seen[zone]
	c.mu.Unlock()
	if last != nil {
		return last, nil
	}
	err := c.checkZone(ctx, zone)
	if err != nil && !errors.Is(err, ErrZoneRefused) {
		return nil, fmt.Errorf("check time zone %q: %w", zone, err)
	}
	a := &zoneAnswer{err: err, warned: map[string]bool{}}
	c.mu.Lock()
	c.seen[zone] = a
	c.mu.Unlock()
	return a, nil
}

func (c *checkedZones) checkZone(ctx context.Context, zone string) error {
	if _, err := LoadZone(zone); err != nil {
		return fmt.Errorf("%w: %w", ErrZoneRefused, err)
	}
	return c.check.CheckZone(ctx, zone)
}

// warn logs each account in a refused zone once per answer.
func (c *checkedZones) warn(a *zoneAnswer, zone string, accounts []string) {
	c.mu.Lock()
	var fresh []string
	for _, acct := range accounts {
		if !a.warned[acct] {
			a.warned[acct] = true
			fresh = append(fresh, acct)
		}
	}
	c.mu.Unlock()
	for _, acct := range fresh {
		c.log.Warn("account time zone cannot be used; its rollups follow UTC (fix the zone, then rebuild its rollups)",
			"account", acct, "timezone", zone, "err", a.err)
	}
}
