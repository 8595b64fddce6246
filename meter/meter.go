// Package meter defines what the operator bills and reports on: a meter
// selects usage events by type and filters, aggregates one property, and
// groups by dimensions. The aggregator rolls meters up and the invoicer
// prices them; both compile a Meter to the same ClickHouse SQL here, so the
// dashboards and the invoice can never disagree about what a meter means.
package meter

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/tollgate-dev/tollgate/schemas"
)

// Aggregation is how a meter combines its events' values.
type Aggregation string

// The aggregations a meter can use.
const (
	Count       Aggregation = "COUNT"
	Sum         Aggregation = "SUM"
	UniqueCount Aggregation = "UNIQUE_COUNT"
	Max         Aggregation = "MAX"
	Latest      Aggregation = "LATEST"
)

// Meter is one operator-defined meter.
type Meter struct {
	// Key identifies the meter in rollups, APIs and prices, e.g. "api_calls".
	Key string `yaml:"key" json:"key"`
	// EventType selects events by their type.
	EventType   string      `yaml:"event_type" json:"event_type"`
	Aggregation Aggregation `yaml:"aggregation" json:"aggregation"`
	// Value is the property aggregated: "units", a numeric event field
	// ("request_bytes", "response_bytes", "latency_us", "status") or
	// "dimensions.NAME". COUNT takes none: it counts events, and a value
	// given to it would only have filtered them (Validate refuses it).
	Value   string   `yaml:"value,omitempty" json:"value,omitempty"`
	GroupBy []string `yaml:"group_by,omitempty" json:"group_by,omitempty"`
	Filters []Filter `yaml:"filters,omitempty" json:"filters,omitempty"`
}

// Filter keeps events whose property equals (or, with Not, differs from)
// one of Values.
type Filter struct {
	Property string   `yaml:"property" json:"property"`
	Values   []string `yaml:"in" json:"in"`
	Not      bool     `yaml:"not,omitempty" json:"not,omitempty"`
}

var (
	keyRe = regexp.MustCompile(`^[a-z][a-z0-9_]{0,62}$`)
	dimRe = regexp.MustCompile(`^dimensions\.[a-z][a-z0-9_]{0,63}$`)
)

// numeric fields of usage_events a meter may aggregate.
var numeric = map[string]string{
	"units":          "units",
	"request_bytes":  "toInt64(request_bytes)",
	"response_bytes": "toInt64(response_bytes)",
	"latency_us":     "toInt64(latency_us)",
	"status":         "toInt64(status)",
}

// string fields a meter may group or filter by.
var fields = map[string]string{
	"route":       "route",
	"method":      "method",
	"status":      "toString(status)",
	"key_id":      "key_id",
	"environment": "toString(environment)",
	"event_type":  "event_type",
}

// Validate reports every problem with the meter at once.
func (m *Meter) Validate() error {
	var errs []error
	bad := func(f string, a ...any) {
		errs = append(errs, fmt.Errorf("meter %q: "+f, append([]any{m.Key}, a...)...))
	}
	if !keyRe.MatchString(m.Key) {
		bad("key must be lower-case letters, digits and _, starting with a letter")
	}
	if schemas.TypeProblem(m.EventType) != "" { // the rule events keep
		bad("event_type %q is not a valid event type", m.EventType)
	}
	switch m.Aggregation {
	case Count:
		if m.Value != "" {
			bad("COUNT counts events and takes no value (got %q): remove value, or use SUM, MAX, LATEST or UNIQUE_COUNT to aggregate it", m.Value)
		}
	case Sum, Max, Latest:
		if _, err := numericExpr(m.Value); err != nil {
			bad("%s needs a numeric value: %v", m.Aggregation, err)
		}
	case UniqueCount:
		if _, err := stringExpr(m.Value); err != nil {
			bad("UNIQUE_COUNT needs a property: %v", err)
		}
	default:
		bad("aggregation %q is not one of COUNT, SUM, UNIQUE_COUNT, MAX, LATEST", m.Aggregation)
	}
	if len(m.GroupBy) > MaxGroupBy {
		bad("group_by: %d properties, at most %d (every rollup query of the meter's event type writes each one)", len(m.GroupBy), MaxGroupBy)
	}
	seen := map[string]bool{}
	for _, g := range m.GroupBy {
		if _, err := stringExpr(g); err != nil {
			bad("group_by: %v", err)
		}
		if seen[g] {
			bad("group_by %q twice", g)
		}
		seen[g] = true
	}
	if len(m.Filters) > MaxFilters {
		bad("filters: %d, at most %d (every rollup query of the meter's event type writes each one)", len(m.Filters), MaxFilters)
	}
	filterBytes := 0
	for _, f := range m.Filters {
		if _, err := stringExpr(f.Property); err != nil {
			bad("filter: %v", err)
		}
		if len(f.Values) == 0 {
			bad("filter on %q has no values", f.Property)
		}
		for _, v := range f.Values {
			// Postgres refuses a NUL, or text that is not UTF-8, in the
			// stored definition: the admin API answered 500.
			if !utf8.ValidString(v) || strings.IndexByte(v, 0) >= 0 {
				bad("filter on %q: value %q is not valid UTF-8 or holds a NUL", f.Property, v)
				break
			}
		}
		filterBytes += FilterValueBytes(f.Values)
	}
	if filterBytes > MaxFilterBytes {
		bad("filters: %d bytes of values as a query writes them, at most %d (every rollup query carries them; filter on a dimension the events carry instead)", filterBytes, MaxFilterBytes)
	}
	return errors.Join(errs...)
}

// MaxGroupBy bounds a meter's group_by properties. Every rollup query of
// the meter's event type writes each one, and the admin API took thousands
// (a 60 KB meter): one such meter made a single event's rollup take 16 s,
// two made the query larger than ClickHouse takes, and every round of that
// event type failed, the billed api_calls included.
const MaxGroupBy = 16

// MaxFilters bounds a meter's filters, for the same reason: each is a
// condition every rollup query of the event type writes, and the admin API
// took 1,695 (an 80 KB condition).
const MaxFilters = 16

// MaxFilterBytes bounds a meter's filter values, all filters together, as
// a query writes them (FilterValueBytes): every rollup query carries them,
// and a few meters with long lists could make one larger than ClickHouse
// takes (256 KiB), failing every round. Counted bare, a list of thousands
// of one-letter values passed at 8 KiB and came to five times that.
const MaxFilterBytes = 8 << 10

// FilterValueBytes is how many bytes values take written into a query:
// each quoted, and separated by a comma and a space.
func FilterValueBytes(values []string) int {
	n := 0
	for _, v := range values {
		n += len(v) + 4
	}
	return n
}

// MaxValue bounds the magnitude of a dimension's value that SUM, MAX and
// LATEST read, as schemas.MaxUnits bounds units: sums are Int64, and a few
// events with values near the Int64 limit, which any client can report,
// would wrap a window's total negative (ten of 999999999999999999 did).
const MaxValue = schemas.MaxUnits

// wholeNumberPattern is the form a dimension's value must have for SUM, MAX
// and LATEST to read it: an optional minus and a whole number of at most
// MaxValue (1 to 12 digits, or 10^12 itself), so ClickHouse and Go read it
// alike.
const wholeNumberPattern = `^-?([0-9]{1,12}|1000000000000)$`

// WholeNumber reads a dimension's value as SUM, MAX and LATEST do; ok is
// false for a value those meters skip.
func WholeNumber(v string) (n int64, ok bool) {
	digits := strings.TrimPrefix(v, "-")
	if len(digits) == 0 || len(digits) > 13 {
		return 0, false
	}
	for i := 0; i < len(digits); i++ {
		if digits[i] < '0' || digits[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(digits[i]-'0')
	}
	if len(digits) == 13 && n != MaxValue {
		return 0, false
	}
	if len(digits) < len(v) {
		n = -n
	}
	return n, true
}

func numericExpr(p string) (string, error) {
	if e, ok := numeric[p]; ok {
		return e, nil
	}
	if dimRe.MatchString(p) {
		return fmt.Sprintf("toInt64OrZero(%s)", dimExpr(p)), nil
	}
	return "", fmt.Errorf("unknown numeric property %q", p)
}

func stringExpr(p string) (string, error) {
	if e, ok := fields[p]; ok {
		return e, nil
	}
	if dimRe.MatchString(p) {
		return dimExpr(p), nil
	}
	return "", fmt.Errorf("unknown property %q (want one of route, method, status, key_id, environment, event_type or dimensions.NAME)", p)
}

// dimExpr reads a dimension from the parallel key/value arrays; a missing
// dimension reads as "" (indexOf returns 0, and arrays are 1-based with a
// default for index 0).
func dimExpr(p string) string {
	name := strings.TrimPrefix(p, "dimensions.")
	return fmt.Sprintf("dim_values[indexOf(dim_keys, '%s')]", name)
}

// Compiled is a meter as SQL fragments over the usage_events columns.
// Every fragment is built from validated names only; no user value is
// interpolated except through Args.
type Compiled struct {
	// Where selects the meter's events (without time or account bounds).
	Where string
	Args  []any
	// GroupBy are expressions for the group-by properties, in order.
	GroupBy []string
	// Aggregate is the aggregate expression over the selected events; it
	// yields Int64 for every aggregation.
	Aggregate string
	// Value is the per-event expression Aggregate aggregates: Int64 for
	// SUM, MAX and LATEST, String for UNIQUE_COUNT, "" for COUNT.
	Value string
	agg   Aggregation
}

// CondUses is how many times If writes its condition: a query binding
// arguments in the condition binds them that many times.
func (c Compiled) CondUses() int {
	if c.agg == Sum {
		return 3 // SaturatingSum reads the float sum twice
	}
	return 1
}

// If is Aggregate over the events for which cond holds, in the
// aggregate's -If form (count() → countIf(cond), sum(x) → sumIf(x, cond)),
// so several meters can be read in one pass; "" is Aggregate itself.
func (c Compiled) If(cond string) string {
	call := func(fn, args string) string {
		switch {
		case cond == "":
			return fn + "(" + args + ")"
		case args == "":
			return fn + "If(" + cond + ")"
		}
		return fn + "If(" + args + ", " + cond + ")"
	}
	switch c.agg {
	case Count:
		return "toInt64(" + call("count", "") + ")"
	case Sum:
		return SaturatingSum(call("sum", "toFloat64("+c.Value+")"), call("sum", c.Value))
	case Max:
		return "toInt64(" + call("max", c.Value) + ")"
	case Latest:
		// The event id breaks ties between events of the same microsecond,
		// so replaying the same events always yields the same value.
		return "toInt64(" + call("argMax", c.Value+", (timestamp_us, toString(event_id))") + ")"
	}
	return "toInt64(" + call("uniqExact", c.Value) + ")"
}

// SaturatingSum is an Int64 SUM that does not wrap: intSum (sum(x), Int64,
// which ClickHouse wraps modulo 2^64) when the total fits in Int64, and
// Int64's largest or smallest value, which no event value comes near, when
// it does not, as floatSum (sum(toFloat64(x)), whose rounding is far below
// the margin) tells. A total in range is exact whatever the order of the
// additions, wrapped or not: wrapping is arithmetic modulo 2^64.
// Overflowed reads such a value.
func SaturatingSum(floatSum, intSum string) string {
	return "multiIf(" + floatSum + " >= 9.2233720368547758e18, toInt64('9223372036854775807'), " +
		floatSum + " < -9.2233720368547758e18, toInt64('-9223372036854775808'), toInt64(" + intSum + "))"
}

// SaturatingSumOfSums adds up col, rows' SaturatingSums, as SaturatingSum
// does, except that a row past Int64 makes the result past Int64 too: its
// largest value if any row is, else its smallest if any row is. The rows'
// own totals are unknown then, so a negative row beside them must not
// bring the sum back into range as if it were exact.
func SaturatingSumOfSums(col string) string {
	return "multiIf(countIf(" + col + " = toInt64('9223372036854775807')) > 0, toInt64('9223372036854775807'), " +
		"countIf(" + col + " = toInt64('-9223372036854775808')) > 0, toInt64('-9223372036854775808'), " +
		SaturatingSum("sum(toFloat64("+col+"))", "sum("+col+")") + ")"
}

// Overflowed reports whether v is a SaturatingSum that did not fit: Int64's
// largest or smallest value. No event's value comes near either (units
// and numeric dimensions are at most 10^12 in magnitude, measures 10^15),
// nor does a COUNT, so a MAX or LATEST cannot be one either.
func Overflowed(v int64) bool { return v == math.MaxInt64 || v == math.MinInt64 }

// Compile turns a valid meter into SQL fragments.
func (m *Meter) Compile() (Compiled, error) {
	if err := m.Validate(); err != nil {
		return Compiled{}, err
	}
	c := Compiled{Where: "event_type = ?", Args: []any{m.EventType}}
	for _, f := range m.Filters {
		e, _ := stringExpr(f.Property)
		// has(array, x) rather than x IN (?): a bound []string renders as
		// an array literal, which IN rejects on ClickHouse 18.16.
		not := ""
		if f.Not {
			not = "NOT "
		}
		c.Where += fmt.Sprintf(" AND %shas(?, %s)", not, e)
		c.Args = append(c.Args, f.Values)
	}
	if dimRe.MatchString(m.Value) {
		// An event counts toward a meter over a dimension only if it has
		// the dimension, and, for a numeric meter, only if the value is a
		// whole number (WholeNumber): a missing or unreadable value would
		// otherwise read as 0, or wrap, and reset a LATEST or lower a MAX.
		if m.Aggregation == UniqueCount {
			c.Where += fmt.Sprintf(" AND has(dim_keys, '%s')", strings.TrimPrefix(m.Value, "dimensions."))
		} else {
			c.Where += fmt.Sprintf(" AND match(%s, '%s')", dimExpr(m.Value), wholeNumberPattern)
		}
	}
	for _, g := range m.GroupBy {
		e, _ := stringExpr(g)
		c.GroupBy = append(c.GroupBy, e)
	}
	c.agg = m.Aggregation
	switch m.Aggregation {
	case Sum, Max, Latest:
		c.Value, _ = numericExpr(m.Value)
	case UniqueCount:
		c.Value, _ = stringExpr(m.Value)
	}
	c.Aggregate = c.If("")
	return c, nil
}

// Default is the meter every installation has: one per proxied call.
func Default() Meter {
	return Meter{Key: "api_calls", EventType: "api_call", Aggregation: Count}
}

// Rollup says how values of this meter over smaller groups combine into a
// coarser grouping: "sum" or "max", or "" when they do not combine
// (UNIQUE_COUNT and LATEST must be computed from the events themselves).
func (m *Meter) Rollup() string {
	switch m.Aggregation {
	case Count, Sum:
		return "sum"
	case Max:
		return "max"
	default:
		return ""
	}
}

// Set is a validated collection of meters with unique keys, in key order.
type Set struct {
	byKey map[string]Meter
	keys  []string
}

// NewSet validates every meter and rejects duplicate keys, reporting every
// problem at once.
func NewSet(ms ...Meter) (*Set, error) {
	s := &Set{byKey: map[string]Meter{}}
	var errs []error
	for _, m := range ms {
		if err := m.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if _, dup := s.byKey[m.Key]; dup {
			errs = append(errs, fmt.Errorf("meter %q defined twice", m.Key))
			continue
		}
		s.byKey[m.Key] = m
		s.keys = append(s.keys, m.Key)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	sort.Strings(s.keys)
	return s, nil
}

// Get returns the meter with key.
func (s *Set) Get(key string) (Meter, bool) {
	m, ok := s.byKey[key]
	return m, ok
}

// All returns the meters in key order.
func (s *Set) All() []Meter {
	out := make([]Meter, len(s.keys))
	for i, k := range s.keys {
		out[i] = s.byKey[k]
	}
	return out
}

// Equal reports whether two meters define the same thing.
func Equal(a, b Meter) bool {
	// Filters are ANDed and each one's values are a set, so their order
	// selects nothing else: reordered, they are the same definition (taken
	// for a new one, they deleted and rebuilt every rollup of the meter).
	// Group-by order is kept: it orders the rows' group values.
	return a.Key == b.Key && a.EventType == b.EventType && a.Aggregation == b.Aggregation && a.Value == b.Value &&
		slices.Equal(a.GroupBy, b.GroupBy) && slices.Equal(canonicalFilters(a.Filters), canonicalFilters(b.Filters))
}

// canonicalFilters are fs as a sorted list of distinct filters, each with
// its values sorted and distinct.
func canonicalFilters(fs []Filter) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		vs := slices.Clone(f.Values)
		slices.Sort(vs)
		out[i] = fmt.Sprintf("%q %t %q", f.Property, f.Not, slices.Compact(vs))
	}
	slices.Sort(out)
	return slices.Compact(out)
}
