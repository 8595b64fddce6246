package aggregator

import (
	"log/slog"
	"time"
)

// SetClock replaces the server's clock, for tests of what a later page of
// a query sees.
func (s *Server) SetClock(now func() time.Time) { s.now = now }

// CheckZones is checkZones with its clock, for tests of how long answers
// are kept.
func CheckZones(z Zones, c ZoneChecker, now func() time.Time) Zones {
	cz := checkZones(z, c, slog.New(slog.DiscardHandler))
	cz.now = now
	return cz
}
