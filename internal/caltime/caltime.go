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
// put a month's first hour into the previous month. Where clocks fall back
// over midnight (as in Asia/Amman on 30 October 2020, from 01:00 to 00:00),
// midnight happens twice and the day begins at the first, as ClickHouse's
// toStartOfDay has it: time.Date may give the second.
func DayStart(y int, m time.Month, d int, loc *time.Location) time.Time {
	t := time.Date(y, m, d, 0, 0, 0, 0, loc)
	want := time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
	lt := t.In(loc)
	if lt.Year() == want.Year() && lt.YearDay() == want.YearDay() {
		if start, _ := t.ZoneBounds(); !start.IsZero() && !start.After(t) {
			// Just before this zone period began, was it the same day
			// already? Then the day began at midnight in the period before.
			before := start.Add(-time.Nanosecond).In(loc)
			if before.Year() == want.Year() && before.YearDay() == want.YearDay() {
				_, off := before.Zone()
				return time.Date(y, m, d, 0, 0, 0, 0, time.FixedZone("", off)).In(loc)
			}
		}
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
