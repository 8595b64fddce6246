package aggregator

import "time"

// SetClock replaces the server's clock, for tests of what a later page of
// a query sees.
func (s *Server) SetClock(now func() time.Time) { s.now = now }
