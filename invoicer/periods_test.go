package invoicer

import (
	"fmt"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
)

// TestDuePeriodsAcrossAZoneChange plans an account's periods after its
// zone changed: every instant from the first invoice on is billed exactly
// once, in as few periods as the months allow, and no invoice is a few
// hours long.
func TestDuePeriodsAcrossAZoneChange(t *testing.T) {
	zone := func(name string) *time.Location {
		loc, err := caltime.LoadZone(name)
		if err != nil {
			t.Fatal(err)
		}
		return loc
	}
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	month := func(y int, m time.Month, loc *time.Location) Period {
		return MonthPeriod(time.Date(y, m, 15, 12, 0, 0, 0, loc), loc)
	}
	cases := []struct {
		name     string
		from, to string
		// the new zone's months considered, and what is due (UTC)
		months []time.Month
		want   []string
	}{
		{"UTC to Tokyo: November from where October's invoice ended", "UTC", "Asia/Tokyo",
			[]time.Month{time.October, time.November, time.December},
			[]string{"2026-11-01T00:00:00Z/2026-11-30T15:00:00Z", "2026-11-30T15:00:00Z/2026-12-31T15:00:00Z"}},
		{"Tokyo to UTC: October's last 9 hours run on with November", "Asia/Tokyo", "UTC",
			[]time.Month{time.October, time.November, time.December},
			[]string{"2026-10-31T15:00:00Z/2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z/2027-01-01T00:00:00Z"}},
		{"UTC to New York: October's last 4 hours run on with November", "UTC", "America/New_York",
			[]time.Month{time.October, time.November, time.December},
			[]string{"2026-11-01T00:00:00Z/2026-12-01T05:00:00Z", "2026-12-01T05:00:00Z/2027-01-01T05:00:00Z"}},
		{"no change: the months not invoiced", "Europe/Berlin", "Europe/Berlin",
			[]time.Month{time.September, time.October, time.November, time.December},
			[]string{"2026-10-31T23:00:00Z/2026-11-30T23:00:00Z", "2026-11-30T23:00:00Z/2026-12-31T23:00:00Z"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			old, loc := zone(c.from), zone(c.to)
			// Invoiced under the old zone: September and October.
			invoiced := []Period{month(2026, time.September, old), month(2026, time.October, old)}
			var months []Period
			for _, m := range c.months {
				months = append(months, month(2026, m, loc))
			}
			next := func(p Period) Period { return MonthPeriod(p.End, loc) }
			all := func(Period) bool { return true }
			got := duePeriods(months, invoiced, next, all)
			var gotS []string
			for _, p := range got {
				gotS = append(gotS, p.Start.UTC().Format(time.RFC3339)+"/"+p.End.UTC().Format(time.RFC3339))
			}
			if fmt.Sprint(gotS) != fmt.Sprint(c.want) {
				t.Errorf("due %v, want %v", gotS, c.want)
			}
			// Whatever is due, each instant from September on is covered
			// exactly once by the invoices and the due periods together.
			every := append(append([]Period(nil), invoiced...), got...)
			for tt := at("2026-09-01T00:00:00Z").Add(30 * time.Minute); tt.Before(got[len(got)-1].End); tt = tt.Add(time.Hour) {
				n := 0
				for _, p := range every {
					if !tt.Before(p.Start) && tt.Before(p.End) {
						n++
					}
				}
				if n != 1 && !tt.Before(invoiced[0].Start) {
					t.Fatalf("%s is in %d periods, want 1", tt.Format(time.RFC3339), n)
				}
			}

			// A period whose usage is not complete yet is not due, and the
			// months it would cover are not billed on their own meanwhile.
			notYet := func(p Period) bool { return p.End.Before(got[0].End) }
			if early := duePeriods(months, invoiced, next, notYet); len(early) != 0 {
				t.Errorf("due before the first period is complete: %v", early)
			}
		})
	}
}

// The open period (what the current-usage and upcoming-invoice endpoints
// show) is the one the next close will bill.
func TestOpenPeriodIsWhatTheNextCloseBills(t *testing.T) {
	ny, err := caltime.LoadZone("America/New_York")
	if err != nil {
		t.Fatal(err)
	}
	utcOctober := Period{Start: time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
	for _, c := range []struct {
		now        time.Time
		start, end string
	}{
		// 22:00 on 31 October in New York: after UTC October's invoice,
		// in New York's October.
		{time.Date(2026, 11, 1, 2, 0, 0, 0, time.UTC), "2026-11-01T00:00:00Z", "2026-12-01T05:00:00Z"},
		{time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC), "2026-11-01T00:00:00Z", "2026-12-01T05:00:00Z"},
		{time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC), "2026-12-01T05:00:00Z", "2027-01-01T05:00:00Z"},
	} {
		p := OpenPeriod(c.now, ny, []Period{utcOctober})
		if got := p.Start.UTC().Format(time.RFC3339) + "/" + p.End.UTC().Format(time.RFC3339); got != c.start+"/"+c.end {
			t.Errorf("at %s: %s, want %s/%s", c.now.Format(time.RFC3339), got, c.start, c.end)
		}
	}
	if p := OpenPeriod(time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC), time.UTC, nil); !p.Start.Equal(time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("no invoices: %+v, want November", p)
	}
}
