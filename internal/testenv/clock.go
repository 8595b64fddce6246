package testenv

import "time"

// MonthClockShift is how far a test that counts per calendar month (a
// monthly quota, the current invoice period) moves the clock of the code
// under test, so that the test does not straddle a month boundary of loc
// when it starts near one. With s = now + shift, s-span and s+span are in
// the month of s: the shift is +span in the first span of a month, -span
// in the last span of a month, and zero in between. A test that runs for
// less than span and places its data at most span before its clock then
// sees a single month whatever the wall-clock time.
func MonthClockShift(now time.Time, loc *time.Location, span time.Duration) time.Duration {
	l := now.In(loc)
	start := time.Date(l.Year(), l.Month(), 1, 0, 0, 0, 0, loc)
	end := time.Date(l.Year(), l.Month()+1, 1, 0, 0, 0, 0, loc)
	switch {
	case now.Before(start.Add(span)):
		return span
	case !now.Add(span).Before(end):
		return -span
	}
	return 0
}
