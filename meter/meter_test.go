package meter

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// WholeNumber and the SQL pattern Compile filters on must agree on every
// value, and every value they take must fit an Int64 exactly.
func TestWholeNumberAgreesWithTheSQLPattern(t *testing.T) {
	re := regexp.MustCompile(wholeNumberPattern)
	for _, v := range []string{"0", "-0", "7", "-7", "12.5", "1e3", "--5", "-", "", " 1", "1 ", "+1", "0x10",
		"999999999999", "-999999999999", "1000000000000", "-1000000000000", "1000000000001", "9999999999999", "0000000000001",
		"999999999999999999", "-999999999999999999", "1000000000000000000", "9223372036854775807", "18446744073709551615", "٣"} {
		n, ok := WholeNumber(v)
		if ok != re.MatchString(v) {
			t.Errorf("%q: WholeNumber says %v, the pattern %v", v, ok, !ok)
		}
		if ok {
			if want, err := strconv.ParseInt(v, 10, 64); err != nil || n != want {
				t.Errorf("%q: WholeNumber reads %d, strconv %d (%v)", v, n, want, err)
			}
			if n > MaxValue || n < -MaxValue {
				t.Errorf("%q: read as %d, beyond MaxValue", v, n)
			}
		}
	}
}

func TestMetersOverADimensionTakeOnlyEventsWithAReadableValue(t *testing.T) {
	for _, c := range []struct {
		m    Meter
		want string
	}{
		{Meter{Key: "s", EventType: "e", Aggregation: Sum, Value: "dimensions.amount"}, "event_type = ? AND match(dim_values[indexOf(dim_keys, 'amount')], '^-?([0-9]{1,12}|1000000000000)$')"},
		{Meter{Key: "u", EventType: "e", Aggregation: UniqueCount, Value: "dimensions.user"}, "event_type = ? AND has(dim_keys, 'user')"},
		{Meter{Key: "c", EventType: "e", Aggregation: Sum, Value: "units"}, "event_type = ?"},
	} {
		got, err := c.m.Compile()
		if err != nil || got.Where != c.want {
			t.Errorf("%s: where %q (%v), want %q", c.m.Key, got.Where, err, c.want)
		}
	}
}

// COUNT counts events: a value given to it used to pass Validate and, for a
// dimension, quietly keep only the events whose value was a whole number.
func TestValidateRefusesAValueTheAggregationWouldNotUse(t *testing.T) {
	for _, c := range []struct {
		name  string
		m     Meter
		valid bool
	}{
		{"COUNT without a value is valid", Meter{Key: "c", EventType: "e", Aggregation: Count}, true},
		{"COUNT of a dimension is refused", Meter{Key: "c", EventType: "e", Aggregation: Count, Value: "dimensions.tokens"}, false},
		{"COUNT of a numeric field is refused", Meter{Key: "c", EventType: "e", Aggregation: Count, Value: "units"}, false},
		{"SUM of a dimension is valid", Meter{Key: "s", EventType: "e", Aggregation: Sum, Value: "dimensions.tokens"}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.m.Validate()
			if c.valid && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !c.valid && (err == nil || !strings.Contains(err.Error(), "COUNT counts events and takes no value")) {
				t.Fatalf("got %v, want COUNT's value refused", err)
			}
		})
	}
}

// A value beyond MaxValue is not read: ten of 999999999999999999, which any
// client can report as a dimension, wrapped an Int64 sum negative.
func TestValuesBeyondTheBoundAreNotRead(t *testing.T) {
	for _, c := range []struct {
		v    string
		want bool
	}{
		{"1000000000000", true}, {"-1000000000000", true}, {"999999999999", true},
		{"1000000000001", false}, {"-1000000000001", false}, {"999999999999999999", false}, {"-999999999999999999", false},
	} {
		if _, ok := WholeNumber(c.v); ok != c.want {
			t.Errorf("WholeNumber(%q) ok=%v, want %v", c.v, ok, c.want)
		}
	}
}

// A meter's filter values are bounded: every rollup query carries them,
// and a meter with thousands of routes in a filter made one larger than
// ClickHouse takes, failing every rollup round of every account.
func TestValidateBoundsTheFilterValues(t *testing.T) {
	routes := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, fmt.Sprintf("/v1/route/%06d", i))
		}
		return out
	}
	ok := Meter{Key: "some_routes", EventType: "api_call", Aggregation: Count, Filters: []Filter{{Property: "route", Values: routes(100)}}}
	if err := ok.Validate(); err != nil {
		t.Fatalf("100 routes: %v", err)
	}
	long := ok
	long.Filters = []Filter{{Property: "route", Values: routes(2000)}}
	if err := long.Validate(); err == nil || !strings.Contains(err.Error(), "filters:") {
		t.Fatalf("2,000 routes (%d bytes): %v, want refused", 2000*len("/v1/route/000000"), err)
	}
	// Counted as a query writes them: 8,000 one-letter values are 8,000
	// bytes bare and five times that written out.
	short := ok
	short.Filters = []Filter{{Property: "route", Values: strings.Split(strings.Repeat("x", 8000), "")}}
	if err := short.Validate(); err == nil || !strings.Contains(err.Error(), "filters:") {
		t.Fatalf("8,000 one-letter values: %v, want refused", err)
	}
}

// Every rollup query of an event type writes each group-by property of its
// meters: the admin API took a meter grouping by 3,600 dimensions, which
// stalled or failed every rollup round of the event type.
func TestValidateBoundsTheGroupBy(t *testing.T) {
	dims := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, fmt.Sprintf("dimensions.d%02d", i))
		}
		return out
	}
	m := Meter{Key: "by_many", EventType: "api_call", Aggregation: Count, GroupBy: dims(MaxGroupBy)}
	if err := m.Validate(); err != nil {
		t.Fatalf("%d group-by properties: %v", MaxGroupBy, err)
	}
	m.GroupBy = dims(MaxGroupBy + 1)
	if err := m.Validate(); err == nil || !strings.Contains(err.Error(), "group_by: 17 properties, at most 16") {
		t.Fatalf("%d group-by properties: %v, want refused", MaxGroupBy+1, err)
	}
}

func TestValidateBoundsTheFilters(t *testing.T) {
	m := Meter{Key: "many_filters", EventType: "api_call", Aggregation: Count}
	for i := range MaxFilters + 1 {
		m.Filters = append(m.Filters, Filter{Property: fmt.Sprintf("dimensions.d%02d", i), Values: []string{"x"}})
	}
	if err := m.Validate(); err == nil || !strings.Contains(err.Error(), "filters: 17, at most 16") {
		t.Fatalf("%d filters: %v, want refused", MaxFilters+1, err)
	}
	m.Filters = m.Filters[:MaxFilters]
	if err := m.Validate(); err != nil {
		t.Fatalf("%d filters: %v", MaxFilters, err)
	}
}

// Filters are ANDed and their values are sets: a meter whose filters or
// values are only reordered (a configuration file reformatted, a meter
// posted again) is the same definition. Before, it was taken for a changed
// one, and every rollup of the meter was deleted and rebuilt. What does
// change the events counted, or the rows' group order, is still a change.
func TestReorderedFiltersAreTheSameDefinition(t *testing.T) {
	a := Meter{Key: "t", EventType: "llm_call", Aggregation: Sum, Value: "units", GroupBy: []string{"route", "method"},
		Filters: []Filter{{Property: "environment", Values: []string{"live", "test"}}, {Property: "method", Values: []string{"GET"}}}}
	same := a
	same.Filters = []Filter{{Property: "method", Values: []string{"GET", "GET"}}, {Property: "environment", Values: []string{"test", "live"}}}
	if !Equal(a, same) {
		t.Error("reordered filters and values: taken for another definition")
	}
	for name, change := range map[string]func(m *Meter){
		"another value": func(m *Meter) {
			m.Filters = []Filter{{Property: "environment", Values: []string{"live"}}, {Property: "method", Values: []string{"GET"}}}
		},
		"a negated filter": func(m *Meter) {
			m.Filters = []Filter{{Property: "environment", Values: []string{"live", "test"}}, {Property: "method", Values: []string{"GET"}, Not: true}}
		},
		"one filter fewer":        func(m *Meter) { m.Filters = m.Filters[:1] },
		"group-by in other order": func(m *Meter) { m.GroupBy = []string{"method", "route"} },
	} {
		b := a
		b.Filters = slices.Clone(a.Filters)
		change(&b)
		if Equal(a, b) {
			t.Errorf("%s: taken for the same definition", name)
		}
	}
}

// A filter value Postgres cannot store (a NUL, text that is not UTF-8) is
// refused as an invalid meter. Before, the meters admin API stored nothing
// and answered 500.
func TestAFilterValuePostgresCannotStoreIsRefused(t *testing.T) {
	for _, v := range []string{"a\x00b", "caf\xe9"} {
		m := Meter{Key: "m", EventType: "api_call", Aggregation: Count, Filters: []Filter{{Property: "route", Values: []string{"/ok", v}}}}
		if err := m.Validate(); err == nil || !strings.Contains(err.Error(), `filter on "route"`) {
			t.Errorf("filter value %q: %v, want it refused", v, err)
		}
	}
	ok := Meter{Key: "m", EventType: "api_call", Aggregation: Count, Filters: []Filter{{Property: "route", Values: []string{"a\tb", "/v1/é"}}}}
	if err := ok.Validate(); err != nil {
		t.Errorf("a tab and an accent: %v, want them taken", err)
	}
}
