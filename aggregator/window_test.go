package aggregator_test

import (
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
)

func TestWindowStart(t *testing.T) {
	tokyo, _ := time.LoadLocation("Asia/Tokyo")
	kolkata, _ := time.LoadLocation("Asia/Kolkata")
	berlin, _ := time.LoadLocation("Europe/Berlin")
	asuncion, _ := time.LoadLocation("America/Asuncion")
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, c := range []struct {
		name       string
		t          string
		g          aggregator.Granularity
		loc        *time.Location
		start, end string
	}{
		{"a minute is the UTC minute", "2026-03-01T10:45:33Z", aggregator.Minute, tokyo, "2026-03-01T10:45:00Z", "2026-03-01T10:46:00Z"},
		{"an hour in a half-hour zone starts at :30 UTC", "2026-03-01T10:45:00Z", aggregator.Hour, kolkata, "2026-03-01T10:30:00Z", "2026-03-01T11:30:00Z"},
		{"a Tokyo day starts at 15:00 UTC the day before", "2026-02-28T20:00:00Z", aggregator.Day, tokyo, "2026-02-28T15:00:00Z", "2026-03-01T15:00:00Z"},
		{"a Tokyo month starts on the local first", "2026-02-28T20:00:00Z", aggregator.Month, tokyo, "2026-02-28T15:00:00Z", "2026-03-31T15:00:00Z"},
		{"a day across the spring DST change lasts 23 hours", "2026-03-29T12:00:00Z", aggregator.Day, berlin, "2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"},
		// Clocks jumped from 00:00 to 01:00 on 1 October 2023 in Asuncion:
		// October starts at the jump (04:00 UTC), as ClickHouse's
		// toStartOfMonth has it, not an hour into September.
		{"a month whose first midnight never happened starts at the jump", "2023-10-15T12:00:00Z", aggregator.Month, asuncion, "2023-10-01T04:00:00Z", "2023-11-01T03:00:00Z"},
		{"so does its first day", "2023-10-01T12:00:00Z", aggregator.Day, asuncion, "2023-10-01T04:00:00Z", "2023-10-02T03:00:00Z"},
		{"and the day before it ends there", "2023-09-30T12:00:00Z", aggregator.Day, asuncion, "2023-09-30T04:00:00Z", "2023-10-01T04:00:00Z"},
		{"a UTC month ends on the first of the next", "2026-12-31T23:59:59Z", aggregator.Month, time.UTC, "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := aggregator.WindowStart(at(c.t), c.g, c.loc)
			e := aggregator.WindowEnd(s, c.g, c.loc)
			if !s.Equal(at(c.start)) || !e.Equal(at(c.end)) {
				t.Errorf("window %s..%s, want %s..%s", s.Format(time.RFC3339), e.Format(time.RFC3339), c.start, c.end)
			}
		})
	}
}
