package aggregator

import (
	"log/slog"
	"time"
)

// SetClock replaces the server's clock, for tests of what a later page of
// a query sees.
func (s *Server) SetClock(now func() time.Time) { s.now = now }

// CheckZones is checkZones, for tests of its answers.
func CheckZones(z Zones, c ZoneChecker) Zones {
	return checkZones(z, c, slog.New(slog.DiscardHandler))
}
