package invoicer

import (
	"testing"
	"time"
)

// Stripe descriptions name a period's first and last day as the customer
// reads them: in the zone the period was cut in, even after the account
// moved to another, across a DST change, and a plan change's line in the
// account's zone.
func TestStripeDescriptionsNameThePeriodsDays(t *testing.T) {
	zone := func(name string) *time.Location {
		loc, err := time.LoadLocation(name)
		if err != nil {
			t.Fatal(err)
		}
		return loc
	}
	tokyo, berlin, utc := zone("Asia/Tokyo"), zone("Europe/Berlin"), time.UTC
	auckland, chatham, kiritimati, apia, kathmandu := zone("Pacific/Auckland"), zone("Pacific/Chatham"), zone("Pacific/Kiritimati"), zone("Pacific/Apia"), zone("Asia/Kathmandu")
	pagoPago, honolulu := zone("Pacific/Pago_Pago"), zone("Pacific/Honolulu")
	month := func(y int, m time.Month, loc *time.Location) Period {
		return MonthPeriod(time.Date(y, m, 10, 0, 0, 0, 0, loc), loc)
	}
	for _, c := range []struct {
		name   string
		period Period
		now    *time.Location // the account's zone when the invoice goes to Stripe
		line   Period         // one line's period within it
		want   string
		line1  string
	}{
		{"a Tokyo March", month(2026, 3, tokyo), tokyo, month(2026, 3, tokyo), "2026-03-01 – 2026-03-31", "2026-03-01 – 2026-03-31"},
		{"a Tokyo March of an account that has moved to UTC since", month(2026, 3, tokyo), utc, month(2026, 3, tokyo), "2026-03-01 – 2026-03-31", "2026-03-01 – 2026-03-31"},
		{"a Berlin October, DST ending in it", month(2026, 10, berlin), berlin, month(2026, 10, berlin), "2026-10-01 – 2026-10-31", "2026-10-01 – 2026-10-31"},
		{"a Berlin October of an account now on UTC", month(2026, 10, berlin), utc, month(2026, 10, berlin), "2026-10-01 – 2026-10-31", "2026-10-01 – 2026-10-31"},
		{"an Auckland July of an account now on UTC", month(2026, 7, auckland), utc, month(2026, 7, auckland), "2026-07-01 – 2026-07-31", "2026-07-01 – 2026-07-31"},
		{"a Chatham (UTC+12:45) July of an account now on UTC", month(2026, 7, chatham), utc, month(2026, 7, chatham), "2026-07-01 – 2026-07-31", "2026-07-01 – 2026-07-31"},
		{"a Kiritimati (UTC+14) March of an account now in Honolulu", month(2026, 3, kiritimati), honolulu, month(2026, 3, kiritimati), "2026-03-01 – 2026-03-31", "2026-03-01 – 2026-03-31"},
		{"an Apia (UTC+13) March of an account now in Pago Pago (UTC−11)", month(2026, 3, apia), pagoPago, month(2026, 3, apia), "2026-03-01 – 2026-03-31", "2026-03-01 – 2026-03-31"},
		{"a Kathmandu (UTC+5:45) March of an account now on UTC", month(2026, 3, kathmandu), utc, month(2026, 3, kathmandu), "2026-03-01 – 2026-03-31", "2026-03-01 – 2026-03-31"},
		{"a plan changed at 16:00 on 11 March", month(2026, 3, utc), utc,
			Period{Start: time.Date(2026, 3, 11, 16, 0, 0, 0, utc), End: month(2026, 3, utc).End}, "2026-03-01 – 2026-03-31", "2026-03-11 – 2026-03-31"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// As stored: the ledger gives the times back in UTC.
			p := Period{Start: c.period.Start.UTC(), End: c.period.End.UTC()}
			line := Period{Start: c.line.Start.UTC(), End: c.line.End.UTC()}
			days := dayZones{loc: c.now, period: p, start: cutZone(p.Start, c.now), end: cutZone(p.End, c.now)}
			if got := days.of(p); got != c.want {
				t.Errorf("invoice: %q, want %q", got, c.want)
			}
			if got := days.of(line); got != c.line1 {
				t.Errorf("line: %q, want %q", got, c.line1)
			}
		})
	}
}
