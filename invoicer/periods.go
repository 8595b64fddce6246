package invoicer

import (
	"sort"
	"time"
)

// mergeTail is the longest stretch of a month that is billed with the
// month beside it rather than on its own. Zone offsets lie between UTC−12
// and UTC+14, so the months of two zones are at most 26 hours apart: what
// invoices made under an account's old zone leave of a month of its new
// zone is either that short (billed with the neighbouring month: an
// invoice of a few hours would carry a whole month's flat fee) or most of
// the month.
const mergeTail = 27 * time.Hour

// duePeriods plans an account's invoices. months are its zone's months in
// the lookback, oldest first and contiguous; invoiced the periods its
// invoices already cover; created when it was created. Every stretch of
// time from the first month's start that no invoice covers is billed once:
// cut at the zone's month starts, so without a zone change each period is
// a whole month, as before. After a zone change, what the old zone's
// invoices leave of a month is a period from where they end (or up to
// where they begin), and a piece no longer than mergeTail is joined to the
// piece beside it. So a zone change never bills an hour twice, and leaves
// none out, whatever months failed to close before it, with one exception:
// a stretch of up to mergeTail at the very start of the lookback, before an
// invoice, whose old-zone month failed to close and lies mostly before the
// lookback (which a close does not bill), is not billed alone. A stretch
// that ends before the account existed is not billed. A period is returned only when
// ready says its usage is complete; what is not ready now is planned the
// same way on a later run.
func duePeriods(months, invoiced []Period, created time.Time, ready func(Period) bool) []Period {
	if len(months) == 0 {
		return nil
	}
	horizon, limit := months[0].Start, months[len(months)-1].End
	var due []Period
	for _, gap := range uncovered(Period{Start: horizon, End: limit}, invoiced) {
		if !gap.End.After(created) {
			continue
		}
		// Open: nothing is invoiced right after it, so it runs on past
		// limit (into months later runs will consider).
		open := gap.End.Equal(limit) && !coveredAt(invoiced, limit)
		pieces := []Period{gap}
		for _, m := range months[1:] {
			last := &pieces[len(pieces)-1]
			if m.Start.After(last.Start) && m.Start.Before(last.End) {
				pieces = append(pieces, Period{Start: m.Start, End: last.End})
				pieces[len(pieces)-2].End = m.Start
			}
		}
		if len(pieces) > 1 && pieces[0].End.Sub(pieces[0].Start) <= mergeTail && !isMonthStart(months, pieces[0].Start) {
			pieces = append([]Period{{Start: pieces[0].Start, End: pieces[1].End}}, pieces[2:]...)
		}
		if n := len(pieces); n > 1 && !open && pieces[n-1].End.Sub(pieces[n-1].Start) <= mergeTail && !isMonthEnd(months, pieces[n-1].End) {
			pieces = append(pieces[:n-2], Period{Start: pieces[n-2].Start, End: pieces[n-1].End})
		}
		if n := len(pieces); open && pieces[n-1].End.Sub(pieces[n-1].Start) <= mergeTail && !isMonthStart(months, pieces[n-1].Start) {
			// A short piece at the end runs on with the next month, which
			// a later run considers: bill nothing of it yet.
			pieces = pieces[:n-1]
		}
		if len(pieces) == 1 && !open && gap.Start.Equal(horizon) && gap.End.Sub(gap.Start) <= mergeTail {
			// A short stretch at the start of the lookback, before an
			// invoice: the rest of its month lies before the lookback,
			// which a close does not bill (the old zone's month there
			// failed to close). Not billed alone, with a month's fee.
			pieces = nil
		}
		for _, p := range pieces {
			if ready(p) {
				due = append(due, p)
			}
		}
	}
	return due
}

func isMonthStart(months []Period, t time.Time) bool {
	for _, m := range months {
		if m.Start.Equal(t) {
			return true
		}
	}
	return false
}

func isMonthEnd(months []Period, t time.Time) bool {
	for _, m := range months {
		if m.End.Equal(t) {
			return true
		}
	}
	return false
}

// coveredAt reports whether a period in covered holds t.
func coveredAt(covered []Period, t time.Time) bool {
	for _, c := range covered {
		if !t.Before(c.Start) && t.Before(c.End) {
			return true
		}
	}
	return false
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
// will bill. invoiced are the periods of the account's invoices.
func OpenPeriod(now time.Time, loc *time.Location, invoiced []Period, created time.Time) Period {
	cur := MonthPeriod(now, loc)
	prev := MonthPeriod(cur.Start.Add(-time.Second), loc)
	next := MonthPeriod(cur.End, loc)
	// With the month after this one considered too, a short piece at the
	// end of this month is planned with it.
	for _, p := range duePeriods([]Period{prev, cur, next}, invoiced, created, func(Period) bool { return true }) {
		if !now.Before(p.Start) && now.Before(p.End) {
			return p
		}
	}
	return cur
}
