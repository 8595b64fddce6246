// Package aggregatortest computes rollups in plain Go, independently of the
// ClickHouse SQL, so tests can check every rollup row against it.
package aggregatortest

import (
	"bytes"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Key identifies one rollup row. Group is the group values joined by "\x00",
// or "" for the meter's total.
type Key struct {
	Account     string
	Environment schemas.Environment
	Granularity aggregator.Granularity
	WindowStart time.Time
	Group       string
	Total       bool
}

type acc struct {
	count, max int64
	// sum is exact; a total past int64 reads as int64's largest or
	// smallest value (meter.SaturatingSum).
	sum       big.Int
	hasMax    bool
	uniq      map[string]struct{}
	latestTS  int64
	latestID  []byte
	latest    int64
	hasLatest bool
}

// Expected computes every rollup row of m over events (each event once) at
// granularity g; zone maps accounts to their time zone (default UTC).
//
// A SUM's hour, day and month rows are computed from the finer ones, as the
// rollups are: a finer row past int64 keeps every coarser row it falls in
// past int64 (meter.SaturatingSumOfSums), whatever the exact total.
func Expected(events []schemas.Event, m meter.Meter, g aggregator.Granularity, zone map[string]*time.Location) map[Key]int64 {
	if f, ok := finerOf[g]; ok && m.Aggregation == meter.Sum {
		return sumsOfSums(Expected(events, m, f, zone), g, zone)
	}
	accs := map[Key]*acc{}
	for _, e := range events {
		if !selects(m, e) {
			continue
		}
		loc := zone[e.AccountID]
		if loc == nil {
			loc = time.UTC
		}
		w := aggregator.WindowStart(e.Time, g, loc)
		keys := []Key{{Account: e.AccountID, Environment: e.Environment, Granularity: g, WindowStart: w, Total: true}}
		if len(m.GroupBy) > 0 {
			vals := make([]string, len(m.GroupBy))
			for i, p := range m.GroupBy {
				vals[i] = str(e, p)
			}
			keys = append(keys, Key{Account: e.AccountID, Environment: e.Environment, Granularity: g, WindowStart: w,
				Group: strings.Join(vals, "\x00")})
		}
		for _, k := range keys {
			a := accs[k]
			if a == nil {
				a = &acc{uniq: map[string]struct{}{}}
				accs[k] = a
			}
			a.add(m, e)
		}
	}
	out := make(map[Key]int64, len(accs))
	for k, a := range accs {
		out[k] = a.value(m)
	}
	return out
}

func (a *acc) add(m meter.Meter, e schemas.Event) {
	a.count++
	switch m.Aggregation {
	case meter.Sum:
		a.sum.Add(&a.sum, big.NewInt(num(e, m.Value)))
	case meter.Max:
		v := num(e, m.Value)
		if !a.hasMax || v > a.max {
			a.max, a.hasMax = v, true
		}
	case meter.UniqueCount:
		a.uniq[str(e, m.Value)] = struct{}{}
	case meter.Latest:
		ts := e.Time.UnixMicro()
		id := e.ID[:]
		if !a.hasLatest || ts > a.latestTS || (ts == a.latestTS && bytes.Compare(id, a.latestID) > 0) {
			a.latestTS, a.latestID, a.latest, a.hasLatest = ts, id, num(e, m.Value), true
		}
	}
}

func (a *acc) value(m meter.Meter) int64 {
	switch m.Aggregation {
	case meter.Count:
		return a.count
	case meter.Sum:
		return saturate(&a.sum)
	case meter.Max:
		return a.max
	case meter.UniqueCount:
		return int64(len(a.uniq))
	default:
		return a.latest
	}
}

func selects(m meter.Meter, e schemas.Event) bool {
	if e.Type != m.EventType {
		return false
	}
	// An event without a readable value is not the meter's (Compile).
	if name, ok := strings.CutPrefix(m.Value, "dimensions."); ok {
		v, has := e.Dimensions[name]
		if !has {
			return false
		}
		if _, whole := meter.WholeNumber(v); !whole && m.Aggregation != meter.UniqueCount {
			return false
		}
	}
	for _, f := range m.Filters {
		v := str(e, f.Property)
		in := false
		for _, x := range f.Values {
			if x == v {
				in = true
			}
		}
		if in == f.Not {
			return false
		}
	}
	return true
}

func str(e schemas.Event, p string) string {
	switch p {
	case "route":
		return e.Route
	case "method":
		return e.Method
	case "status":
		return strconv.Itoa(e.Status)
	case "key_id":
		return e.KeyID
	case "environment":
		return string(e.Environment)
	case "event_type":
		return e.Type
	}
	return e.Dimensions[strings.TrimPrefix(p, "dimensions.")]
}

func num(e schemas.Event, p string) int64 {
	switch p {
	case "units":
		return e.Units
	case "request_bytes":
		return e.RequestBytes
	case "response_bytes":
		return e.ResponseBytes
	case "latency_us":
		return e.LatencyMicros
	case "status":
		return int64(e.Status)
	}
	v, _ := meter.WholeNumber(e.Dimensions[strings.TrimPrefix(p, "dimensions.")])
	return v
}

// Locations loads each account's time zone.
func Locations(zones map[string]string) (map[string]*time.Location, error) {
	out := make(map[string]*time.Location, len(zones))
	for a, z := range zones {
		l, err := time.LoadLocation(z)
		if err != nil {
			return nil, err
		}
		out[a] = l
	}
	return out, nil
}

// Diff describes how got differs from want: a count mismatch and up to max
// rows that are missing or have another value.
func Diff(want, got map[Key]int64, max int) []string {
	var out []string
	if len(got) != len(want) {
		out = append(out, fmt.Sprintf("%d rollup rows, want %d", len(got), len(want)))
	}
	for k, w := range want {
		if len(out) > max {
			break
		}
		if g, ok := got[k]; !ok || g != w {
			out = append(out, fmt.Sprintf("%+v: got %d (present %v), want %d", k, g, ok, w))
		}
	}
	return out
}

// finerOf is the granularity the rollups compute a coarser one from.
var finerOf = map[aggregator.Granularity]aggregator.Granularity{
	aggregator.Hour: aggregator.Minute, aggregator.Day: aggregator.Hour, aggregator.Month: aggregator.Day,
}

// sumsOfSums combines finer SUM rows into rows of g, as
// meter.SaturatingSumOfSums does.
func sumsOfSums(finer map[Key]int64, g aggregator.Granularity, zone map[string]*time.Location) map[Key]int64 {
	type sum struct {
		total  big.Int
		hi, lo bool
	}
	sums := map[Key]*sum{}
	for k, v := range finer {
		loc := zone[k.Account]
		if loc == nil {
			loc = time.UTC
		}
		c := k
		c.Granularity, c.WindowStart = g, aggregator.WindowStart(k.WindowStart, g, loc)
		s := sums[c]
		if s == nil {
			s = &sum{}
			sums[c] = s
		}
		s.hi = s.hi || v == math.MaxInt64
		s.lo = s.lo || v == math.MinInt64
		s.total.Add(&s.total, big.NewInt(v))
	}
	out := make(map[Key]int64, len(sums))
	for k, s := range sums {
		switch {
		case s.hi:
			out[k] = math.MaxInt64
		case s.lo:
			out[k] = math.MinInt64
		default:
			out[k] = saturate(&s.total)
		}
	}
	return out
}

// saturate is v, or int64's largest or smallest value when v is past it.
func saturate(v *big.Int) int64 {
	switch {
	case v.IsInt64():
		return v.Int64()
	case v.Sign() > 0:
		return math.MaxInt64
	}
	return math.MinInt64
}
