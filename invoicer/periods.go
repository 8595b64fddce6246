package invoicer

import (
	"sort"
	"time"
)

// mergeTail is the longest leftover of a month that is billed with the
// month after it rather than on its own. Zone offsets lie between UTC−12
// and UTC+14, so the months of two zones are at most 26 hours apart: what
// an invoice made under an account's old zone leaves of a month of its new
// zone is either that short (billed with the next month, not as an invoice
// of a few hours) or most of the month.
const mergeTail = 27 * time.Hour

// duePeriods plans an account's invoices: months are its zone's months in
// the lookback, oldest first, and invoiced the periods its invoices
// already cover. Each stretch of a month no invoice covers is a period to
// bill, so a zone change neither bills an hour twice nor leaves one out:
// usually that stretch is the whole month; after a zone change it is what
// the last invoice under the old zone left of the month, billed from where
// that invoice ended, and a leftover at the end of a month no longer than
// mergeTail runs on to the end of the next month. A period is returned
// only when ready says its usage is complete; one that is not yet still
// keeps the months it covers from being billed on their own.
func duePeriods(months, invoiced []Period, next func(Period) Period, ready func(Period) bool) []Period {
	covered := append([]Period(nil), invoiced...)
	var due []Period
	for _, m := range months {
		for _, gap := range uncovered(m, covered) {
			if gap.End.Equal(m.End) && gap.End.Sub(gap.Start) <= mergeTail && gap.Start.After(m.Start) {
				gap.End = next(m).End
			}
			covered = append(covered, gap)
			if ready(gap) {
				due = append(due, gap)
			}
		}
	}
	return due
}

// uncovered returns the stretches of m that no period in covered overlaps,
// in order.
func uncovered(m Period, covered []Period) []Period {
	var over []Period
	for _, c := range covered {
		if c.Start.Before(m.End) && c.End.After(m.Start) {
			over = append(over, c)
		}
	}
	sort.Slice(over, func(i, j int) bool { return over[i].Start.Before(over[j].Start) })
	var gaps []Period
	at := m.Start
	for _, c := range over {
		if c.Start.After(at) {
			gaps = append(gaps, Period{Start: at, End: c.Start})
		}
		if c.End.After(at) {
			at = c.End
		}
	}
	if at.Before(m.End) {
		gaps = append(gaps, Period{Start: at, End: m.End})
	}
	return gaps
}

// OpenPeriod is the period an account's next invoice will cover that holds
// now: its zone's month, or, after a zone change, the period duePeriods
// will bill (from where the last invoice ended). invoiced are the periods
// of the account's invoices.
func OpenPeriod(now time.Time, loc *time.Location, invoiced []Period) Period {
	cur := MonthPeriod(now, loc)
	prev := MonthPeriod(cur.Start.Add(-time.Second), loc)
	next := func(p Period) Period { return MonthPeriod(p.End, loc) }
	for _, p := range duePeriods([]Period{prev, cur}, invoiced, next, func(Period) bool { return true }) {
		if !now.Before(p.Start) && now.Before(p.End) {
			return p
		}
	}
	return cur
}
