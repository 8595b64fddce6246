package api

import "time"

// SetClock replaces the server's clock, for tests that must stay inside
// one invoice period whatever the wall-clock time.
func (s *Server) SetClock(now func() time.Time) { s.now = now }
