package invoicer

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
)

func zoneT(t *testing.T, name string) *time.Location {
	t.Helper()
	loc, err := caltime.LoadZone(name)
	if err != nil {
		t.Fatal(err)
	}
	return loc
}

func monthsOf(loc *time.Location, from time.Time, n int) []Period {
	p := MonthPeriod(from, loc)
	out := []Period{p}
	for len(out) < n {
		p = MonthPeriod(p.End, loc)
		out = append(out, p)
	}
	return out
}

func spans(ps []Period) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.Start.UTC().Format(time.RFC3339)+"/"+p.End.UTC().Format(time.RFC3339))
	}
	return fmt.Sprint(s)
}

// TestDuePeriodsAcrossAZoneChange plans an account's periods after its
// zone changed, with and without a month that failed to close before the
// change: the expected periods, written out by hand.
func TestDuePeriodsAcrossAZoneChange(t *testing.T) {
	all := func(Period) bool { return true }
	longAgo := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	oct15 := time.Date(2026, 10, 15, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		name     string
		from, to string
		invoiced []time.Month // the old zone's months with an invoice
		created  time.Time
		want     []string
	}{
		{"UTC to Tokyo: November from where October's invoice ended", "UTC", "Asia/Tokyo",
			[]time.Month{time.September, time.October}, longAgo,
			[]string{"2026-11-01T00:00:00Z/2026-11-30T15:00:00Z", "2026-11-30T15:00:00Z/2026-12-31T15:00:00Z"}},
		{"Tokyo to UTC: October's last 9 hours run on with November", "Asia/Tokyo", "UTC",
			[]time.Month{time.September, time.October}, longAgo,
			[]string{"2026-10-31T15:00:00Z/2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z/2027-01-01T00:00:00Z"}},
		{"UTC to New York: October's last 4 hours run on with November", "UTC", "America/New_York",
			[]time.Month{time.September, time.October}, longAgo,
			[]string{"2026-11-01T00:00:00Z/2026-12-01T05:00:00Z", "2026-12-01T05:00:00Z/2027-01-01T05:00:00Z"}},
		{"no change: the months not invoiced", "Europe/Berlin", "Europe/Berlin",
			[]time.Month{time.September, time.October}, longAgo,
			[]string{"2026-10-31T23:00:00Z/2026-11-30T23:00:00Z", "2026-11-30T23:00:00Z/2026-12-31T23:00:00Z"}},
		{"no change, October failed: October alone", "UTC", "UTC",
			[]time.Month{time.September, time.November}, longAgo,
			[]string{"2026-10-01T00:00:00Z/2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z/2027-01-01T00:00:00Z"}},
		// The hole October left is cut at Tokyo's 1 November; its last
		// 9 hours join the rest of it rather than make an invoice alone.
		{"UTC to Tokyo, October failed: the hole is one period", "UTC", "Asia/Tokyo",
			[]time.Month{time.September, time.November}, longAgo,
			[]string{"2026-10-01T00:00:00Z/2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z/2026-12-31T15:00:00Z"}},
		// Karachi's October failed and its November was invoiced; on UTC
		// the hole is 30 September 19:00 to 31 October 19:00, one period,
		// ending where the November invoice begins.
		{"Karachi to UTC, October failed: no hour of November twice", "Asia/Karachi", "UTC",
			[]time.Month{time.September, time.November}, longAgo,
			[]string{"2026-09-30T19:00:00Z/2026-10-31T19:00:00Z", "2026-11-30T19:00:00Z/2027-01-01T00:00:00Z"}},
		// Created on 15 October: Tokyo's October begins 9 hours before
		// the first (UTC) invoice; that stretch predates the account.
		{"created mid-October, UTC to Tokyo: nothing before the account", "UTC", "Asia/Tokyo",
			[]time.Month{time.October}, oct15,
			[]string{"2026-11-01T00:00:00Z/2026-11-30T15:00:00Z", "2026-11-30T15:00:00Z/2026-12-31T15:00:00Z"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			old, loc := zoneT(t, c.from), zoneT(t, c.to)
			var invoiced []Period
			for _, m := range c.invoiced {
				invoiced = append(invoiced, MonthPeriod(time.Date(2026, m, 15, 12, 0, 0, 0, old), old))
			}
			months := monthsOf(loc, time.Date(2026, 9, 15, 12, 0, 0, 0, loc), 4) // September to December
			for len(months) > 0 && !months[0].End.After(c.created) {
				months = months[1:]
			}
			got := duePeriods(months, invoiced, c.created, all)
			if spans(got) != fmt.Sprint(c.want) {
				t.Errorf("due %s, want %v", spans(got), c.want)
			}
		})
	}
}

// TestDuePeriodsBillEveryHourOnce plans random histories: an account
// changes zone (or not) after months of invoices, some of which failed
// to close; whatever is due, together with what was invoiced, covers every
// instant from the account's creation to the end of the last month once,
// and no period is shorter than mergeTail unless it lies between two
// invoices. A later run with more months plans nothing that overlaps.
func TestDuePeriodsBillEveryHourOnce(t *testing.T) {
	zones := []string{"UTC", "Asia/Tokyo", "America/New_York", "Asia/Karachi", "Asia/Kolkata", "Pacific/Kiritimati",
		"Etc/GMT+12", "Australia/Lord_Howe", "America/St_Johns", "Europe/Berlin", "Pacific/Apia"}
	rng := rand.New(rand.NewPCG(3, 5))
	for run := 0; run < 3000; run++ {
		old, loc := zoneT(t, zones[rng.IntN(len(zones))]), zoneT(t, zones[rng.IntN(len(zones))])
		created := time.Date(2026, time.Month(1+rng.IntN(3)), 1+rng.IntN(28), rng.IntN(24), 0, 0, 0, time.UTC)
		// Invoices under the old zone, from the creation month to about
		// July; each month fails with probability 0.2.
		var invoiced []Period
		for p := MonthPeriod(created, old); p.Start.Before(time.Date(2026, 7, 1, 0, 0, 0, 0, time.UTC)); p = MonthPeriod(p.End, old) {
			if rng.IntN(5) > 0 {
				invoiced = append(invoiced, p)
			}
		}
		months := monthsOf(loc, created, 10) // the creation month on
		ready := func(p Period) bool { return !p.End.After(months[7].End) }
		due := duePeriods(months, invoiced, created, ready)
		every := append(append([]Period(nil), invoiced...), due...)
		for _, p := range due {
			short := p.End.Sub(p.Start) <= mergeTail
			if short && !(coveredAt(invoiced, p.Start.Add(-time.Second)) && coveredAt(invoiced, p.End)) {
				t.Fatalf("run %d (%s → %s): period %s is %s long and not between two invoices (invoiced %s)",
					run, old, loc, spans([]Period{p}), p.End.Sub(p.Start), spans(invoiced))
			}
		}
		end := months[7].End.Add(-mergeTail) // the last stretch may wait for the next month
		// A short stretch at the start, before the first invoice, is not
		// billed alone (its old-zone month failed to close).
		skipped := Period{Start: months[0].Start, End: months[0].Start}
		if len(invoiced) > 0 && invoiced[0].Start.Sub(months[0].Start) > 0 && invoiced[0].Start.Sub(months[0].Start) <= mergeTail {
			skipped.End = invoiced[0].Start
		}
		for at := created.Truncate(time.Hour).Add(time.Hour + 30*time.Minute); at.Before(end); at = at.Add(time.Hour) {
			if !at.Before(skipped.Start) && at.Before(skipped.End) {
				continue
			}
			n := 0
			for _, p := range every {
				if !at.Before(p.Start) && at.Before(p.End) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("run %d (%s → %s, created %s): %s is in %d periods\ninvoiced %s\ndue %s", run, old, loc,
					created.Format(time.RFC3339), at.Format(time.RFC3339), n, spans(invoiced), spans(due))
			}
		}
		// The next run, a month on, with what this one billed invoiced.
		later := duePeriods(months[:9], every, created, func(p Period) bool { return !p.End.After(months[8].End) })
		for _, p := range later {
			for _, q := range every {
				if p.Start.Before(q.End) && q.Start.Before(p.End) {
					t.Fatalf("run %d (%s → %s): the next run plans %s over %s", run, old, loc, spans([]Period{p}), spans([]Period{q}))
				}
			}
		}
	}
}

// The open period (what the current-usage and upcoming-invoice endpoints
// show) is the one the next close will bill.
func TestOpenPeriodIsWhatTheNextCloseBills(t *testing.T) {
	ny := zoneT(t, "America/New_York")
	utcOctober := Period{Start: time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
	created := time.Date(2026, 9, 20, 0, 0, 0, 0, time.UTC)
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
		p := OpenPeriod(c.now, ny, []Period{utcOctober}, created)
		if got := spans([]Period{p}); got != fmt.Sprint([]string{c.start + "/" + c.end}) {
			t.Errorf("at %s: %s, want %s/%s", c.now.Format(time.RFC3339), got, c.start, c.end)
		}
	}
	if p := OpenPeriod(time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC), time.UTC, nil, created); !p.Start.Equal(time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("no invoices: %+v, want November", p)
	}
}

// TestDuePeriodsOverSuccessiveCloses runs duePeriods as CloseDue does,
// run after run over 20 months of an account's life: the lookback's past
// months in the zone of the day, a period ready once its end plus the
// grace is under a watermark that lags (now and then by weeks), up to three
// zone changes at any moment, and in half the histories a fifth of the
// invoices failing (retried on the next run). No run plans a period over
// one already billed, nor one of 27 hours or less except between two
// invoices; without failures or outages every hour from the account's
// creation to the last invoice is billed exactly once.
func TestDuePeriodsOverSuccessiveCloses(t *testing.T) {
	zones := []string{"UTC", "Asia/Tokyo", "America/New_York", "Asia/Karachi", "Pacific/Kiritimati", "Etc/GMT+12",
		"Australia/Lord_Howe", "America/St_Johns", "Pacific/Chatham", "Europe/Berlin", "Pacific/Apia", "America/Asuncion"}
	locs := make([]*time.Location, len(zones))
	for i, z := range zones {
		locs[i] = zoneT(t, z)
	}
	rng := rand.New(rand.NewPCG(11, 13))
	for hist := 0; hist < 1500; hist++ {
		rough := hist%2 == 1 // failures and outages
		created := time.Date(2025, time.Month(1+rng.IntN(12)), 1+rng.IntN(28), rng.IntN(24), rng.IntN(60), 0, 0, time.UTC)
		type change struct {
			at  time.Time
			loc *time.Location
		}
		changes := []change{{created, locs[rng.IntN(len(locs))]}}
		for k := rng.IntN(4); k > 0; k-- {
			changes = append(changes, change{created.Add(time.Duration(rng.IntN(600*24)) * time.Hour), locs[rng.IntN(len(locs))]})
		}
		sort.Slice(changes, func(i, j int) bool { return changes[i].at.Before(changes[j].at) })
		zoneAt := func(at time.Time) *time.Location {
			loc := changes[0].loc
			for _, c := range changes {
				if !c.at.After(at) {
					loc = c.loc
				}
			}
			return loc
		}
		lookback := 2 + rng.IntN(3)
		var invoiced []Period
		end := created.AddDate(0, 20, 0)
		for now := created.Add(time.Duration(rng.IntN(72)) * time.Hour); now.Before(end); now = now.Add(time.Duration(1+rng.IntN(20*24)) * time.Hour) {
			loc := zoneAt(now)
			grace := time.Duration(rng.IntN(72)) * time.Hour
			wm := now.Add(-time.Duration(rng.IntN(48)) * time.Hour)
			if rough && rng.IntN(15) == 0 {
				wm = now.Add(-time.Duration(10+rng.IntN(35)) * 24 * time.Hour) // an outage upstream
			}
			var months []Period
			p := MonthPeriod(now, loc)
			for i := 0; i < lookback; i++ {
				p = MonthPeriod(p.Start.Add(-time.Second), loc)
				if !p.End.After(created) {
					break
				}
				months = append(months, p)
			}
			slices.Reverse(months)
			ready := func(p Period) bool { return !p.End.Add(grace).After(wm) }
			for _, d := range duePeriods(months, invoiced, created, ready) {
				for _, q := range invoiced {
					if d.Start.Before(q.End) && q.Start.Before(d.End) {
						t.Fatalf("history %d, run at %s (%s): plans %s over the billed %s", hist, now.Format(time.RFC3339), loc,
							spans([]Period{d}), spans([]Period{q}))
					}
				}
				if d.End.Sub(d.Start) <= mergeTail && !(coveredAt(invoiced, d.Start.Add(-time.Second)) && coveredAt(invoiced, d.End)) {
					t.Fatalf("history %d, run at %s (%s): plans %s, %s long, not between two invoices\nbilled %s", hist,
						now.Format(time.RFC3339), loc, spans([]Period{d}), d.End.Sub(d.Start), spans(invoiced))
				}
				if rough && rng.IntN(5) == 0 {
					continue // this invoice failed; the next run tries again
				}
				invoiced = append(invoiced, d)
			}
		}
		if rough || len(invoiced) == 0 {
			continue
		}
		last := invoiced[0].End
		for _, q := range invoiced {
			if q.End.After(last) {
				last = q.End
			}
		}
		for at := created.Truncate(time.Hour).Add(time.Hour + 30*time.Minute); at.Before(last); at = at.Add(time.Hour) {
			n := 0
			for _, q := range invoiced {
				if !at.Before(q.Start) && at.Before(q.End) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("history %d (created %s, zones %v): %s is on %d invoices\nbilled %s", hist, created.Format(time.RFC3339),
					changes, at.Format(time.RFC3339), n, spans(invoiced))
			}
		}
	}
}
