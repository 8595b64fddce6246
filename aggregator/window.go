package aggregator

import (
	"fmt"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
)

// Granularity is the length of a rollup window.
type Granularity string

// The window lengths rollups keep. Hour, day and month windows start on
// the account's local hour, midnight and first of the month.
const (
	Minute Granularity = "minute"
	Hour   Granularity = "hour"
	Day    Granularity = "day"
	Month  Granularity = "month"
)

// Granularities lists every granularity, finest first.
var Granularities = []Granularity{Minute, Hour, Day, Month}

// ParseGranularity accepts the names above.
func ParseGranularity(s string) (Granularity, error) {
	for _, g := range Granularities {
		if string(g) == s {
			return g, nil
		}
	}
	return "", fmt.Errorf("unknown window %q (want minute, hour, day or month)", s)
}

// WindowStart is the start of the window of granularity g that holds t, in
// loc. It agrees with the ClickHouse expressions in the clickhouse package
// (toStartOfMinute, toStartOfHour(t, tz), toStartOfDay(t, tz),
// toStartOfMonth(toTimeZone(t, tz))).
func WindowStart(t time.Time, g Granularity, loc *time.Location) time.Time {
	l := t.In(loc)
	switch g {
	case Minute:
		return t.UTC().Truncate(time.Minute)
	case Hour:
		return l.Add(-time.Duration(l.Minute())*time.Minute - time.Duration(l.Second())*time.Second -
			time.Duration(l.Nanosecond())).UTC()
	case Day:
		return caltime.DayStart(l.Year(), l.Month(), l.Day(), loc).UTC()
	default:
		return caltime.MonthStart(l.Year(), l.Month(), loc).UTC()
	}
}

// WindowEnd is the end (exclusive) of the window that starts at start.
func WindowEnd(start time.Time, g Granularity, loc *time.Location) time.Time {
	l := start.In(loc)
	switch g {
	case Minute:
		return start.Add(time.Minute)
	case Hour:
		return start.Add(time.Hour)
	case Day:
		return caltime.DayStart(l.Year(), l.Month(), l.Day()+1, loc).UTC()
	default:
		return caltime.MonthStart(l.Year(), l.Month()+1, loc).UTC()
	}
}

// MaxSpan bounds a window's length, for primary-key range bounds.
func MaxSpan(g Granularity) time.Duration {
	switch g {
	case Minute:
		return time.Minute
	case Hour:
		return time.Hour
	case Day:
		return 25 * time.Hour
	default:
		return 32 * 24 * time.Hour
	}
}
