package testenv

import (
	"testing"
	"time"
)

func monthOf(t time.Time, loc *time.Location) time.Time {
	l := t.In(loc)
	return time.Date(l.Year(), l.Month(), 1, 0, 0, 0, 0, loc)
}

// TestMonthClockShiftKeepsATestInOneMonth sweeps every minute of the last
// and the first day of months of every length (and a leap February), in
// UTC and in zones whose month starts off the UTC hour or under DST, plus
// every second of the span around each month start.
func TestMonthClockShiftKeepsATestInOneMonth(t *testing.T) {
	const span = 10 * time.Minute
	for _, zone := range []string{"UTC", "Pacific/Auckland", "America/Los_Angeles", "Asia/Kolkata"} {
		loc, err := time.LoadLocation(zone)
		if err != nil {
			t.Fatal(err)
		}
		check := func(now time.Time) {
			shift := MonthClockShift(now, loc, span)
			s := now.Add(shift)
			m := monthOf(s, loc)
			if shift < -span || shift > span || !monthOf(s.Add(-span), loc).Equal(m) || !monthOf(s.Add(span), loc).Equal(m) {
				t.Fatalf("%s, now %s: shift %s gives %s, whose span of %s either side leaves its month",
					zone, now.Format(time.RFC3339), shift, s.Format(time.RFC3339), span)
			}
			start := monthOf(now, loc)
			if away := now.Sub(start) >= span && now.Add(span).Before(start.AddDate(0, 1, 0)); away && shift != 0 {
				t.Fatalf("%s, now %s: shift %s, want none away from the month's ends", zone, now.Format(time.RFC3339), shift)
			}
		}
		for _, first := range []string{"2026-01-01", "2026-02-01", "2026-03-01", "2026-05-01", "2026-12-01", "2027-01-01", "2028-03-01"} {
			d, err := time.ParseInLocation(time.DateOnly, first, loc)
			if err != nil {
				t.Fatal(err)
			}
			for m := -24 * 60; m < 24*60; m++ {
				check(d.Add(time.Duration(m)*time.Minute + 17*time.Second))
			}
			for s := -2 * span; s < 2*span; s += time.Second {
				check(d.Add(s))
			}
		}
		// Mid-month, the clock is left alone.
		for _, now := range []time.Time{time.Date(2026, 2, 14, 12, 0, 0, 0, loc), time.Date(2026, 7, 31, 23, 40, 0, 0, loc), time.Date(2026, 8, 1, 0, 10, 0, 0, loc)} {
			if shift := MonthClockShift(now, loc, span); shift != 0 {
				t.Errorf("%s, now %s: shift %s, want none", zone, now.Format(time.RFC3339), shift)
			}
		}
	}
}
