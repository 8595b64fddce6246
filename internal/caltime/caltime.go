// Package caltime finds where calendar days and months begin in a time
// zone, as ClickHouse's toStartOfDay and toStartOfMonth do.
package caltime

import (
	"errors"
	"time"
)

// DayStart is the first instant of the calendar day y-m-d in loc (the date
// is normalized as time.Date normalizes it, so day 0 is the last day of the
// month before and month 13 is January). Where clocks jump forward over
// midnight (as in America/Asuncion on 1 October 2023), the day begins at
// the jump: time.Date would give an instant of the day before, which would
// put a month's first hour into the previous month.
func DayStart(y int, m time.Month, d int, loc *time.Location) time.Time {
	t := time.Date(y, m, d, 0, 0, 0, 0, loc)
	want := time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
	lt := t.In(loc)
	if lt.Year() == want.Year() && lt.YearDay() == want.YearDay() {
		return t
	}
	if _, end := t.ZoneBounds(); !end.IsZero() {
		return end
	}
	return t
}

// MonthStart is the first instant of month m of year y in loc.
func MonthStart(y int, m time.Month, loc *time.Location) time.Time {
	return DayStart(y, m, 1, loc)
}

// LoadZone is time.LoadLocation for an account's zone, but "Local" is an
// error: it names each machine's own zone, so two processes (and ClickHouse,
// which does not know it) would disagree on the account's days and months.
// An empty name is UTC, as for time.LoadLocation.
func LoadZone(name string) (*time.Location, error) {
	if name == "Local" {
		return nil, errors.New(`time zone "Local" is each machine's own; name a zone such as "Europe/Berlin"`)
	}
	return time.LoadLocation(name)
}
