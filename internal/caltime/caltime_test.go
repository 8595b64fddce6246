package caltime

import (
	"testing"
	"time"
)

func TestDayStart(t *testing.T) {
	zone := func(name string) *time.Location {
		loc, err := time.LoadLocation(name)
		if err != nil {
			t.Fatalf("load %s: %v", name, err)
		}
		return loc
	}
	for _, c := range []struct {
		name string
		loc  *time.Location
		y    int
		m    time.Month
		d    int
		want string // RFC 3339 in loc
	}{
		{"an ordinary midnight", zone("Asia/Tokyo"), 2026, time.March, 1, "2026-03-01T00:00:00+09:00"},
		{"a month starting where clocks jump over midnight begins at the jump", zone("America/Asuncion"), 2023, time.October, 1, "2023-10-01T01:00:00-03:00"},
		{"the same in Havana", zone("America/Havana"), 2012, time.April, 1, "2012-04-01T01:00:00-04:00"},
		{"a day whose clocks go back later keeps its midnight", zone("Europe/Berlin"), 2026, time.October, 25, "2026-10-25T00:00:00+02:00"},
		{"month 13 is next January", zone("UTC"), 2026, 13, 1, "2027-01-01T00:00:00Z"},
		{"a day whose midnight happens twice begins at the first", zone("Asia/Amman"), 2020, time.October, 30, "2020-10-30T00:00:00+03:00"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := DayStart(c.y, c.m, c.d, c.loc).In(c.loc).Format(time.RFC3339); got != c.want {
				t.Errorf("DayStart = %s, want %s", got, c.want)
			}
		})
	}
}

// Every day of 2000–2039 in every zone with a skipped or a doubled
// midnight, and a few without: DayStart falls on the day asked for, and
// the instant before it on the day before.
func TestDayStartIsTheFirstInstantOfItsDay(t *testing.T) {
	for _, name := range []string{"America/Asuncion", "America/Havana", "America/Santiago", "Asia/Beirut", "America/Sao_Paulo", "Europe/London", "Asia/Tokyo",
		"Asia/Amman", "Asia/Gaza", "Asia/Hebron"} {
		loc, err := time.LoadLocation(name)
		if err != nil {
			t.Fatalf("load %s: %v", name, err)
		}
		for d := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC); d.Year() < 2040; d = d.AddDate(0, 0, 1) {
			s := DayStart(d.Year(), d.Month(), d.Day(), loc)
			in, before := s.In(loc), s.Add(-time.Second).In(loc)
			if in.Year() != d.Year() || in.YearDay() != d.YearDay() {
				t.Fatalf("%s %s: DayStart %s is on another day", name, d.Format("2006-01-02"), in)
			}
			if before.Year() == d.Year() && before.YearDay() == d.YearDay() {
				t.Fatalf("%s %s: a second before DayStart %s is on the same day", name, d.Format("2006-01-02"), in)
			}
		}
	}
}

func TestLoadZoneRefusesLocal(t *testing.T) {
	if _, err := LoadZone("Local"); err == nil {
		t.Fatal(`LoadZone("Local") succeeded`)
	}
	for _, name := range []string{"", "UTC", "Asia/Kolkata"} {
		if _, err := LoadZone(name); err != nil {
			t.Errorf("LoadZone(%q): %v", name, err)
		}
	}
}
