package aggregator

import (
	"context"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
)

// StaticMeters is a fixed meter list.
type StaticMeters []meter.Meter

// Meters returns the list.
func (s StaticMeters) Meters(context.Context) ([]meter.Meter, error) { return s, nil }

// StaticZones is a fixed account-to-zone map.
type StaticZones map[string]string

// Zones returns the zones of the accounts it knows.
func (s StaticZones) Zones(_ context.Context, accounts []string) (map[string]string, error) {
	out := make(map[string]string, len(accounts))
	for _, a := range accounts {
		if z, ok := s[a]; ok {
			out[a] = z
		}
	}
	return out, nil
}

// LoadZone resolves an IANA name, treating "" as UTC.
func LoadZone(name string) (*time.Location, error) {
	if name == "" {
		return time.UTC, nil
	}
	return caltime.LoadZone(name)
}
