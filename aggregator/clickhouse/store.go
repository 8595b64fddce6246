// Package clickhouse computes rollups from the raw events table and reads
// them for the usage API.
package clickhouse

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	chgo "github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
)

// Store reads and writes rollups through conn.
type Store struct {
	conn driver.Conn
}

var (
	_ aggregator.RollupStore = (*Store)(nil)
	_ aggregator.UsageStore  = (*Store)(nil)
)

// NewStore returns a Store.
func NewStore(conn driver.Conn) *Store { return &Store{conn: conn} }

var zoneRe = regexp.MustCompile(`^[A-Za-z0-9_+/-]{1,64}$`)

// windowExpr is the ClickHouse expression for the start of col's window.
// It must agree with aggregator.WindowStart.
func windowExpr(g aggregator.Granularity, zone, col string) string {
	switch g {
	case aggregator.Minute:
		return fmt.Sprintf("toStartOfMinute(%s)", col)
	case aggregator.Hour:
		return fmt.Sprintf("toStartOfHour(%s, '%s')", col, zone)
	case aggregator.Day:
		return fmt.Sprintf("toStartOfDay(%s, '%s')", col, zone)
	default:
		return fmt.Sprintf("toDateTime(toStartOfMonth(toTimeZone(%s, '%s')), '%s')", col, zone, zone)
	}
}

// quote renders s as a ClickHouse string literal.
func quote(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

func dt(t time.Time) string { return fmt.Sprintf("toDateTime(%d, 'UTC')", t.Unix()) }

// timeRange is one [from, to) interval of a scan.
type timeRange struct{ from, to time.Time }

// maxScans bounds the queries one recompute issues per level. Touched
// windows are clustered so each query scans one tight time range: late
// events can touch windows weeks apart in one batch, and one range over all
// of them would read (and deduplicate) everything in between. An OR of many
// ranges is no answer: ClickHouse 18.16 analyses it very slowly.
const maxScans = 6

// cluster groups windows (each with the indexes of the touched minutes in
// it) into at most maxScans clusters, joining the closest first.
func cluster(rs []timeRange, members [][]int) ([]timeRange, [][]int) {
	idx := make([]int, len(rs))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return rs[idx[a]].from.Before(rs[idx[b]].from) })
	var out []timeRange
	var mem [][]int
	for _, i := range idx {
		r := rs[i]
		if n := len(out); n > 0 && !r.from.After(out[n-1].to) {
			if r.to.After(out[n-1].to) {
				out[n-1].to = r.to
			}
			mem[n-1] = append(mem[n-1], members[i]...)
			continue
		}
		out = append(out, r)
		mem = append(mem, append([]int(nil), members[i]...))
	}
	for len(out) > maxScans {
		best := 0
		for i := 1; i < len(out)-1; i++ {
			if out[i+1].from.Sub(out[i].to) < out[best+1].from.Sub(out[best].to) {
				best = i
			}
		}
		out[best].to = out[best+1].to
		mem[best] = append(mem[best], mem[best+1]...)
		out = append(out[:best+1], out[best+2:]...)
		mem = append(mem[:best+1], mem[best+2:]...)
	}
	return out, mem
}

// finer is the granularity a coarser one is computed from.
var finer = map[aggregator.Granularity]aggregator.Granularity{
	aggregator.Hour: aggregator.Minute, aggregator.Day: aggregator.Hour, aggregator.Month: aggregator.Day,
}

// extraColumnsAll are the columns only some aggregations fill; the others
// write neutral values, so SELECTs of different meters can share an INSERT.
const extraColumnsAll = ", latest_us, latest_id, uniq_state"

// fromRaw are the value expressions of a minute row over raw events.
func fromRaw(c meter.Compiled, m meter.Meter) string {
	switch m.Aggregation {
	case meter.Latest:
		return c.Aggregate + ", count(), tupleElement(max((timestamp_us, toString(event_id))), 1), tupleElement(max((timestamp_us, toString(event_id))), 2), " + emptyUniq
	case meter.UniqueCount:
		return c.Aggregate + ", count(), materialize(toUInt64(0)), materialize(''), uniqExactState(" + c.Value + ")"
	}
	return c.Aggregate + ", count(), materialize(toUInt64(0)), materialize(''), " + emptyUniq
}

// fromFiner are the value expressions of a row over its finer rows.
func fromFiner(m meter.Meter) string {
	switch m.Aggregation {
	case meter.Max:
		return "toInt64(max(value)), sum(events), materialize(toUInt64(0)), materialize(''), " + emptyUniq
	case meter.Latest:
		return "toInt64(argMax(value, (latest_us, latest_id))), sum(events), tupleElement(max((latest_us, latest_id)), 1), tupleElement(max((latest_us, latest_id)), 2), " + emptyUniq
	case meter.UniqueCount:
		return "toInt64(uniqExactMerge(uniq_state)), sum(events), materialize(toUInt64(0)), materialize(''), uniqExactMergeState(uniq_state)"
	}
	return sumOfValues + ", sum(events), materialize(toUInt64(0)), materialize(''), " + emptyUniq
}

// sumOfValues adds rows' values up without wrapping: a total beyond Int64
// is Int64's largest (or smallest) value, as the minute rows' own sums are,
// and so is a total over a row that is (meter.SaturatingSumOfSums).
var sumOfValues = meter.SaturatingSumOfSums("value")

// emptyUniq is an empty uniqExact state, for meters that keep none.
const emptyUniq = "uniqExactStateIf('', 0)"

const rollupColumns = "account_id, environment, meter, granularity, window_start, group_values, computed_at, value, events"

// levelSelect builds the SELECT that recomputes windows of one meter and
// granularity: minute windows from usage_events FINAL, coarser ones from
// the next finer rollup rows. scan bounds what is read (on the primary
// key); windowFilter, over the new window start w, selects what is written.
func levelSelect(c meter.Compiled, m meter.Meter, g aggregator.Granularity, zone string, accounts []string,
	scan timeRange, windowFilter string) string {
	qa := make([]string, len(accounts))
	for i, a := range accounts {
		qa[i] = quote(a)
	}
	if g == aggregator.Minute {
		groups := "[emptyArrayString()]"
		if len(c.GroupBy) > 0 {
			groups = "[emptyArrayString(), [" + strings.Join(c.GroupBy, ", ") + "]]"
		}
		return fmt.Sprintf(`SELECT account_id, environment, materialize(%s), materialize('minute'), w, group_values, materialize(now()), %s
FROM (
    SELECT *, toStartOfMinute(timestamp) AS w, arrayJoin(%s) AS group_values
    FROM usage_events FINAL
    WHERE account_id IN (%s) AND timestamp >= %s AND timestamp < %s AND (%s) AND (%s)
)
GROUP BY account_id, environment, w, group_values`,
			quote(m.Key), fromRaw(c, m), groups, strings.Join(qa, ", "),
			dt(scan.from), dt(scan.to), c.Where, windowFilter)
	}
	return fmt.Sprintf(`SELECT account_id, environment, meter, materialize(%s), %s AS w, group_values, materialize(now()), %s
FROM usage_rollups FINAL
WHERE account_id IN (%s) AND meter = %s AND granularity = %s AND window_start >= %s AND window_start < %s AND (%s)
GROUP BY account_id, environment, meter, w, group_values`,
		quote(string(g)), windowExpr(g, zone, "window_start"), fromFiner(m),
		strings.Join(qa, ", "), quote(m.Key), quote(string(finer[g])), dt(scan.from), dt(scan.to), windowFilter)
}

// Recompute rewrites every window holding a touched minute, for every
// request in rs (all of one granularity), in as few INSERTs as ClickHouse's
// query size limit allows (almost always one): one new part per batch and
// level keeps ClickHouse's merges ahead of ingest. The finer granularity
// must have been recomputed first.
func (s *Store) Recompute(ctx context.Context, rs []aggregator.Recompute) error {
	type sel struct {
		sql  string
		args []any
	}
	var sels []sel
	for _, group := range sharedScans(rs) {
		r := group[0]
		for _, part := range chunkTouched(touchedAt(r.Touched, r.Granularity), maxQueryBytes/2) {
			r.Touched = part
			var q []string
			var a []any
			var err error
			if len(group) == 1 {
				q, a, err = recomputeSelects(r)
			} else {
				q, a, err = sharedSelects(group, part)
			}
			if err != nil {
				return err
			}
			for _, q := range q {
				sels = append(sels, sel{q, a})
			}
		}
	}
	head := "INSERT INTO usage_rollups (" + rollupColumns + extraColumnsAll + ")\n"
	for len(sels) > 0 {
		n, size := 0, len(head)
		// The bound arguments (the meters' filter values) are written into
		// the query's text too, once per SELECT: they count.
		for n < len(sels) && (n == 0 || size+len(sels[n].sql)+argBytes(sels[n].args) <= maxQueryBytes) {
			size += len(sels[n].sql) + argBytes(sels[n].args) + len("\nUNION ALL\n")
			n++
		}
		qs := make([]string, n)
		var args []any
		for i, x := range sels[:n] {
			qs[i] = x.sql
			args = append(args, x.args...)
		}
		if err := s.conn.Exec(ctx, head+strings.Join(qs, "\nUNION ALL\n"), args...); err != nil {
			return fmt.Errorf("recompute %s rollups: %w", rs[0].Granularity, err)
		}
		sels = sels[n:]
	}
	return nil
}

// argBytes is about as many bytes as args take once bound into a query's
// text: a string quoted, with room for escapes, and a list of them.
func argBytes(args []any) int {
	n := 0
	for _, a := range args {
		switch v := a.(type) {
		case string:
			n += 2*len(v) + 3
		case []string:
			for _, x := range v {
				n += 2*len(x) + 3
			}
		default:
			n += 32
		}
	}
	return n
}

// maxQueryBytes keeps a recompute INSERT under ClickHouse's default
// max_query_size (256 KiB), with room for the arguments bound into it; one
// SELECT's list of touched windows gets half of it. A burst of late events
// can touch thousands of minutes at once, and an INSERT over the limit
// would fail on every retry.
const maxQueryBytes = 200_000

// touchedAt is ts at the resolution level g needs to find its windows by,
// without repeats: minutes for the minute level and quarter hours above it.
// Every zone's offset from UTC is a whole number of quarter hours, in Go's
// rules and in ClickHouse's (even where the two disagree, see
// recomputeSelects), so every instant of a UTC quarter hour lies in the same
// hour, day and month window; more instants would only lengthen the query.
func touchedAt(ts []aggregator.Touched, g aggregator.Granularity) []aggregator.Touched {
	if g == aggregator.Minute {
		return ts
	}
	seen := make(map[aggregator.Touched]struct{}, len(ts))
	out := make([]aggregator.Touched, 0, len(ts))
	for _, t := range ts {
		t.Minute = t.Minute.Truncate(15 * time.Minute)
		if _, ok := seen[t]; !ok {
			seen[t] = struct{}{}
			out = append(out, t)
		}
	}
	return out
}

// chunkTouched splits ts, in order, into runs whose touched-window lists
// stay under budget bytes in a query.
func chunkTouched(ts []aggregator.Touched, budget int) [][]aggregator.Touched {
	return chunk(ts, budget, func(t aggregator.Touched) int {
		return len(t.Account) + 24 // 'account', 'live', 1795745497, in three lists
	})
}

// chunk splits xs, in order, into runs whose sizes add up to budget at
// most; a run has one element at least, whatever its size.
func chunk[T any](xs []T, budget int, size func(T) int) [][]T {
	var out [][]T
	start, sum := 0, 0
	for i, x := range xs {
		n := size(x)
		if i > start && sum+n > budget {
			out = append(out, xs[start:i])
			start, sum = i, 0
		}
		sum += n
	}
	if start < len(xs) {
		out = append(out, xs[start:])
	}
	return out
}

// recomputeSelects are the SELECTs for one meter and zone, one per cluster
// of touched windows, and the arguments each takes.
func recomputeSelects(r aggregator.Recompute) ([]string, []any, error) {
	c, err := r.Meter.Compile()
	if err != nil {
		return nil, nil, err
	}
	scans, err := touchedScans(r)
	if err != nil {
		return nil, nil, err
	}
	out := make([]string, 0, len(scans))
	for _, sc := range scans {
		out = append(out, levelSelect(c, r.Meter, r.Granularity, r.Zone, sc.accounts, sc.timeRange, sc.filter))
	}
	return out, c.Args, nil
}

// sharedScans groups requests that one scan can serve: those of meters on
// the same event type, in the same zone, with the same touched minutes (as
// the Roller makes them). Minute requests share one read of the raw events,
// coarser ones one read of the finer rollup rows.
//
// A scan carries the filter values and expressions of all its meters and
// cannot be split, so a group's stay under maxSharedFilterBytes: a new
// group starts past it. Seven meters at the bound on filter values made one
// SELECT larger than ClickHouse takes, which failed every round; so would a
// few hundred meters each grouping by as many long dimension names as they
// may.
func sharedScans(rs []aggregator.Recompute) [][]aggregator.Recompute {
	type key struct{ eventType, zone string }
	var out [][]aggregator.Recompute
	seen := map[key]int{}
	size := map[int]int{} // a group's filter values (as argBytes counts them) and expressions
	for _, r := range rs {
		k := key{r.Meter.EventType, r.Zone}
		n := filterArgBytes(r.Meter) + exprBytes(r.Meter)
		if i, ok := seen[k]; ok && slices.Equal(out[i][0].Touched, r.Touched) && size[i]+n <= maxSharedFilterBytes {
			out[i] = append(out[i], r)
			size[i] += n
			continue
		}
		seen[k] = len(out)
		size[len(out)] = n
		out = append(out, []aggregator.Recompute{r})
	}
	return out
}

// maxSharedFilterBytes bounds the filter values of the meters one shared
// scan serves, as argBytes counts them, with their expressions: with a
// chunk of touched windows (maxQueryBytes/2) and the query's own text, one
// SELECT stays under maxQueryBytes. Each meter's values are at most
// meter.MaxFilterBytes written out, which argBytes counts up to twice, and
// its expressions a few KB at most (meter.MaxGroupBy and meter.MaxFilters
// properties, each name at most 64 characters), so a scan always takes at
// least one meter.
const maxSharedFilterBytes = maxQueryBytes / 4

// exprBytes is about the length of m's expressions as a shared scan
// writes them (sharedMinuteSelect): its condition, group-by properties,
// aggregate and value.
func exprBytes(m meter.Meter) int {
	c, err := m.Compile()
	if err != nil {
		return 0 // the scan's SELECT refuses it
	}
	n := len(c.Where) + len(c.Aggregate) + len(c.Value)
	for _, g := range c.GroupBy {
		n += len(g) + 2
	}
	return n
}

// filterArgBytes is argBytes of m's filter values.
func filterArgBytes(m meter.Meter) int {
	n := 0
	for _, f := range m.Filters {
		n += argBytes([]any{f.Values})
	}
	return n
}

// sharedSelects recompute the touched windows of several meters, touched
// alike and in one zone, with one read per cluster instead of one per
// meter: of the raw events at the minute level (sharedMinuteSelect), of the
// finer rollup rows above it (sharedFinerSelect).
func sharedSelects(rs []aggregator.Recompute, touched []aggregator.Touched) ([]string, []any, error) {
	r := rs[0]
	r.Touched = touched
	scans, err := touchedScans(r)
	if err != nil {
		return nil, nil, err
	}
	ms := make([]meter.Meter, len(rs))
	for i, r := range rs {
		ms[i] = r.Meter
	}
	out := make([]string, 0, len(scans))
	var args []any
	for _, sc := range scans {
		var q string
		var a []any
		if r.Granularity == aggregator.Minute {
			q, a, err = sharedMinuteSelect(ms, sc.accounts, sc.timeRange, sc.filter)
		} else {
			q, err = sharedFinerSelect(ms, r.Granularity, r.Zone, sc.accounts, sc.timeRange, sc.filter)
		}
		if err != nil {
			return nil, nil, err
		}
		out, args = append(out, q), a
	}
	return out, args, nil
}

// sharedFinerSelect computes the rows of granularity g of several meters
// from their finer rows in one read. Rows are grouped by meter as before;
// each group takes its own meter's combination of the finer rows
// (fromFiner), so the rows are the ones a SELECT per meter writes. The
// LATEST and UNIQUE_COUNT columns of other meters' finer rows are zero and
// empty, so combining them for every meter gives those meters the neutral
// values they always had.
func sharedFinerSelect(ms []meter.Meter, g aggregator.Granularity, zone string, accounts []string, scan timeRange, windowFilter string) (string, error) {
	var keys, maxes, latest, uniq []string
	for _, m := range ms {
		if err := m.Validate(); err != nil {
			return "", err
		}
		k := quote(m.Key)
		keys = append(keys, k)
		switch m.Aggregation {
		case meter.Max:
			maxes = append(maxes, k)
		case meter.Latest:
			latest = append(latest, k)
		case meter.UniqueCount:
			uniq = append(uniq, k)
		}
	}
	value := sumOfValues
	for _, c := range []struct {
		keys []string
		expr string
	}{
		{uniq, "toInt64(uniqExactMerge(uniq_state))"},
		{latest, "toInt64(argMax(value, (latest_us, latest_id)))"},
		{maxes, "toInt64(max(value))"},
	} {
		if len(c.keys) > 0 {
			value = "if(meter IN (" + strings.Join(c.keys, ", ") + "), " + c.expr + ", " + value + ")"
		}
	}
	latestUs, latestID := "materialize(toUInt64(0))", "materialize('')"
	if len(latest) > 0 {
		latestUs = "tupleElement(max((latest_us, latest_id)), 1)"
		latestID = "tupleElement(max((latest_us, latest_id)), 2)"
	}
	uniqState := emptyUniq
	if len(uniq) > 0 {
		uniqState = "uniqExactMergeState(uniq_state)"
	}
	qa := make([]string, len(accounts))
	for i, a := range accounts {
		qa[i] = quote(a)
	}
	return fmt.Sprintf(`SELECT account_id, environment, meter, materialize(%s), %s AS w, group_values, materialize(now()), %s, sum(events), %s, %s, %s
FROM usage_rollups FINAL
WHERE account_id IN (%s) AND meter IN (%s) AND granularity = %s AND window_start >= %s AND window_start < %s AND (%s)
GROUP BY account_id, environment, meter, w, group_values`,
		quote(string(g)), windowExpr(g, zone, "window_start"), value, latestUs, latestID, uniqState,
		strings.Join(qa, ", "), strings.Join(keys, ", "), quote(string(finer[g])), dt(scan.from), dt(scan.to), windowFilter), nil
}

// sharedMinuteSelect computes the minute rows of several meters on one
// event type in one scan of the raw events. Each raw row is expanded once
// for every meter whose filter it passes (mi, the meter's position in ms,
// from 1) and every group of that meter (the filters are computed outside
// arrayFilter's lambda: ClickHouse 18.16 does not resolve, inside a lambda,
// a column the query reads nowhere else); each (mi, group) row then takes its
// own meter's aggregate, written exactly as levelSelect writes it, so the
// rows are the ones a SELECT per meter would write.
func sharedMinuteSelect(ms []meter.Meter, accounts []string, scan timeRange, windowFilter string) (string, []any, error) {
	var keys, conds, groups, aggs, latest, uniq, uniqVals []string
	var args []any
	positions := make([]string, len(ms))
	for i, m := range ms {
		c, err := m.Compile()
		if err != nil {
			return "", nil, err
		}
		n := strconv.Itoa(i + 1)
		positions[i] = n
		keys = append(keys, quote(m.Key))
		conds = append(conds, "toUInt8("+c.Where+")")
		args = append(args, c.Args...)
		g := "[emptyArrayString()]"
		if len(c.GroupBy) > 0 {
			g = "[emptyArrayString(), [" + strings.Join(c.GroupBy, ", ") + "]]"
		}
		groups = append(groups, "mi = "+n+", "+g)
		aggs = append(aggs, "mi = "+n+", "+c.Aggregate)
		switch m.Aggregation {
		case meter.Latest:
			latest = append(latest, n)
		case meter.UniqueCount:
			uniq = append(uniq, n)
			uniqVals = append(uniqVals, "mi = "+n+", "+c.Value)
		}
	}
	args = append(args, ms[0].EventType)
	latestUs, latestID := "materialize(toUInt64(0))", "materialize('')"
	if len(latest) > 0 {
		in := "has([" + strings.Join(latest, ", ") + "], mi)"
		latestUs = "if(" + in + ", tupleElement(max((timestamp_us, toString(event_id))), 1), toUInt64(0))"
		latestID = "if(" + in + ", tupleElement(max((timestamp_us, toString(event_id))), 2), '')"
	}
	uniqState := emptyUniq
	if len(uniq) > 0 {
		uniqState = "uniqExactStateIf(multiIf(" + strings.Join(uniqVals, ", ") + ", ''), has([" + strings.Join(uniq, ", ") + "], mi))"
	}
	qa := make([]string, len(accounts))
	for i, a := range accounts {
		qa[i] = quote(a)
	}
	return fmt.Sprintf(`SELECT account_id, environment, arrayElement([%s], mi), materialize('minute'), w, group_values, materialize(now()),
    multiIf(%s, toInt64(0)), count(), %s, %s, %s
FROM (
    SELECT *, toStartOfMinute(timestamp) AS w,
        arrayJoin(arrayFilter((i, pass) -> pass = 1, [%s], [%s])) AS mi,
        arrayJoin(multiIf(%s, [emptyArrayString()])) AS group_values
    FROM usage_events FINAL
    WHERE account_id IN (%s) AND timestamp >= %s AND timestamp < %s AND event_type = ? AND (%s)
)
GROUP BY account_id, environment, w, mi, group_values`,
		strings.Join(keys, ", "), strings.Join(aggs, ", "), latestUs, latestID, uniqState,
		strings.Join(positions, ", "), strings.Join(conds, ", "), strings.Join(groups, ", "),
		strings.Join(qa, ", "), dt(scan.from), dt(scan.to), windowFilter), args, nil
}

// touchedScan is one SELECT's share of a recompute: the time range it reads, the
// accounts it reads them for, and the filter (over the window start w)
// that keeps only the touched windows.
type touchedScan struct {
	timeRange
	accounts []string
	filter   string
}

// touchedScans clusters r's touched windows into at most maxScans scans.
func touchedScans(r aggregator.Recompute) ([]touchedScan, error) {
	if len(r.Touched) == 0 {
		return nil, nil
	}
	loc, err := zone(r.Zone)
	if err != nil {
		return nil, err
	}
	// Windows touched, each with the touched minutes inside it.
	type win struct {
		start time.Time
		acct  string
	}
	byWin := map[win][]int{}
	var wins []win
	for i, t := range r.Touched {
		w := win{aggregator.WindowStart(t.Minute, r.Granularity, loc), t.Account}
		if _, ok := byWin[w]; !ok {
			wins = append(wins, w)
		}
		byWin[w] = append(byWin[w], i)
	}
	// Three hours of margin on both sides of a zoned window: Go's zone
	// rules and ClickHouse's can disagree on where it starts. ClickHouse
	// 18.16 starts Australia/Lord_Howe's hours 30 minutes off for about a
	// day after each of its clock changes (TestRollupsWhereGoAndClickHouse-
	// DisagreeOnAZone), and, compared on every quarter hour of 2020-2029
	// over 418 zones, days start up to 3 hours apart (Antarctica/Casey on
	// 2020-03-08, a zone whose offset changed by 3 hours). The margin reads
	// finer rollup rows only, a few per group; the windows kept are still
	// ClickHouse's own. Minute windows are UTC minutes on both sides
	// (toStartOfMinute of a UTC DateTime), so their scan of the raw events
	// is exact.
	margin := 3 * time.Hour
	if r.Granularity == aggregator.Minute {
		margin = 0
	}
	rs := make([]timeRange, len(wins))
	members := make([][]int, len(wins))
	for i, w := range wins {
		rs[i] = timeRange{w.start.Add(-margin), aggregator.WindowEnd(w.start, r.Granularity, loc).Add(margin)}
		members[i] = byWin[w]
	}
	ranges, groups := cluster(rs, members)
	out := make([]touchedScan, 0, len(ranges))
	for i, tr := range ranges {
		seen := map[string]struct{}{}
		var acc []string
		accs := make([]string, 0, len(groups[i]))
		envs := make([]string, 0, len(groups[i]))
		mins := make([]string, 0, len(groups[i]))
		for _, j := range groups[i] {
			t := r.Touched[j]
			if _, ok := seen[t.Account]; !ok {
				seen[t.Account] = struct{}{}
				acc = append(acc, t.Account)
			}
			accs = append(accs, quote(t.Account))
			envs = append(envs, quote(string(t.Environment)))
			mins = append(mins, strconv.FormatInt(t.Minute.Unix(), 10))
		}
		// Only the touched windows are written, so a cluster's wide scan
		// never writes a window it did not read whole. The touched minutes
		// are three parallel arrays of plain literals, zipped by ARRAY
		// JOIN: ClickHouse 18.16 takes about 4 s to analyse an array of
		// 2,400 tuple literals, and under 0.1 s for the same values as
		// arrays of strings and numbers (a late batch in bench-ingest went
		// from 11.7 s to 4.3 s).
		filter := fmt.Sprintf(`(account_id, toString(environment), w) IN (
        SELECT touched_account, touched_env, %s
        FROM (SELECT [%s] AS touched_account, [%s] AS touched_env, [%s] AS touched_minute)
        ARRAY JOIN touched_account, touched_env, touched_minute)`,
			windowExpr(r.Granularity, r.Zone, "toDateTime(touched_minute, 'UTC')"),
			strings.Join(accs, ", "), strings.Join(envs, ", "), strings.Join(mins, ", "))
		out = append(out, touchedScan{timeRange: tr, accounts: acc, filter: filter})
	}
	return out, nil
}

// Rebuild rewrites every window of one granularity that starts in
// [From, To), for each request in rs; they share their granularity, zone,
// accounts and range. Minute windows of meters on one event type are
// computed in one scan of the raw events (sharedMinuteSelect), coarser
// windows of every meter in one read of the finer rows (sharedFinerSelect).
// The finer granularity must have been rebuilt first.
func (s *Store) Rebuild(ctx context.Context, rs []aggregator.Rebuild) error {
	if len(rs) == 0 || len(rs[0].Accounts) == 0 {
		return nil
	}
	r := rs[0]
	if _, err := zone(r.Zone); err != nil {
		return err
	}
	filter := fmt.Sprintf("w >= %s AND w < %s", dt(r.From), dt(r.To))
	scan := timeRange{r.From, r.To.Add(aggregator.MaxSpan(r.Granularity))}
	head := "INSERT INTO usage_rollups (" + rollupColumns + extraColumnsAll + ")\n"
	if r.Granularity == aggregator.Minute {
		byType := map[string][]meter.Meter{}
		var types []string
		for _, r := range rs {
			if byType[r.Meter.EventType] == nil {
				types = append(types, r.Meter.EventType)
			}
			byType[r.Meter.EventType] = append(byType[r.Meter.EventType], r.Meter)
		}
		for _, t := range types {
			for _, ms := range chunk(byType[t], maxSharedFilterBytes, filterArgBytes) {
				q, args, err := sharedMinuteSelect(ms, r.Accounts, scan, filter)
				if err != nil {
					return err
				}
				if err := s.conn.Exec(ctx, head+q, args...); err != nil {
					return fmt.Errorf("rebuild minute rollups of %s meters: %w", t, err)
				}
			}
		}
		return nil
	}
	ms := make([]meter.Meter, len(rs))
	for i, r := range rs {
		ms[i] = r.Meter
	}
	q, err := sharedFinerSelect(ms, r.Granularity, r.Zone, r.Accounts, scan, filter)
	if err != nil {
		return err
	}
	if err := s.conn.Exec(ctx, head+q); err != nil {
		return fmt.Errorf("rebuild %s rollups: %w", r.Granularity, err)
	}
	return nil
}

// CheckZone evaluates the window expressions of every granularity in zone.
// ClickHouse refuses a zone its tzdata lacks (one newer than the server,
// the right/ zones) that Go may load: 18.16 with "Cannot load time zone"
// as a Poco exception (code 1000), current releases as BAD_ARGUMENTS (36).
// Any other failure (ClickHouse down, say) is not a refusal.
func (s *Store) CheckZone(ctx context.Context, name string) error {
	if !zoneRe.MatchString(name) {
		return fmt.Errorf("%w: %q is not a valid IANA name", aggregator.ErrZoneRefused, name)
	}
	exprs := make([]string, 0, len(aggregator.Granularities))
	for _, g := range aggregator.Granularities {
		// A fixed instant: the same answer on every server and run.
		exprs = append(exprs, windowExpr(g, name, "toDateTime(1767225600)"))
	}
	rows, err := s.conn.Query(ctx, "SELECT "+strings.Join(exprs, ", "))
	if err == nil {
		for rows.Next() {
		}
		err = rows.Err()
		rows.Close()
	}
	var ex *chgo.Exception
	// Only an error that says so is a refusal: the same codes cover other
	// failures (1000 any system error on 18.16, such as too many open
	// files), and a refusal is kept for the process's life.
	if errors.As(err, &ex) && (ex.Code == 36 || ex.Code == 1000) && strings.Contains(strings.ToLower(ex.Message), "time zone") {
		return fmt.Errorf("%w by ClickHouse: %s", aggregator.ErrZoneRefused, ex.Message)
	}
	if err != nil {
		return fmt.Errorf("check time zone %q: %w", name, err)
	}
	return nil
}

func zone(name string) (*time.Location, error) {
	if !zoneRe.MatchString(name) {
		return nil, fmt.Errorf("time zone %q: not a valid IANA name", name)
	}
	loc, err := caltime.LoadZone(name)
	if err != nil {
		return nil, fmt.Errorf("time zone %q: %w", name, err)
	}
	return loc, nil
}

// DeleteRollups deletes the rollup rows of meters, at every granularity,
// whose windows start in [from, to), and waits until ClickHouse has applied
// the deletion. The deletion is a mutation of the parts that exist when it
// is issued, so rows written after it (a rebuild's, ingest's) are kept.
// When no row matches it issues none: a mutation rewrites parts, and the
// backfill of a new meter, whose key usually has no rows, deletes first.
func (s *Store) DeleteRollups(ctx context.Context, meters []string, from, to time.Time) error {
	if len(meters) == 0 {
		return nil
	}
	keys := make([]string, len(meters))
	for i, m := range meters {
		keys[i] = quote(m)
	}
	return s.deleteWhere(ctx, fmt.Sprintf("meter IN (%s) AND window_start >= %s AND window_start < %s", strings.Join(keys, ", "), dt(from), dt(to)))
}

// DeleteCoarseRollups deletes account's hour, day and month rows of meters,
// and returns once they are gone: a zone change moves those windows, and
// its minute rows, which do not move, are what they are rebuilt from.
func (s *Store) DeleteCoarseRollups(ctx context.Context, account string, meters []string) error {
	if len(meters) == 0 {
		return nil
	}
	keys := make([]string, len(meters))
	for i, m := range meters {
		keys[i] = quote(m)
	}
	return s.deleteWhere(ctx, fmt.Sprintf("account_id = %s AND meter IN (%s) AND granularity IN ('hour', 'day', 'month')", quote(account), strings.Join(keys, ", ")))
}

// AccountMinutes is the first and last window start of account's minute
// rows; ok is false when it has none.
func (s *Store) AccountMinutes(ctx context.Context, account string) (time.Time, time.Time, bool, error) {
	var n uint64
	var first, last time.Time
	if err := s.conn.QueryRow(ctx, `SELECT count(), min(window_start), max(window_start) FROM usage_rollups
		WHERE account_id = ? AND granularity = 'minute'`, account).Scan(&n, &first, &last); err != nil {
		return time.Time{}, time.Time{}, false, fmt.Errorf("minute rollups of account %s: %w", account, err)
	}
	return first, last, n > 0, nil
}

// deleteWhere deletes the rollup rows where says, and returns once the
// mutation is done. Where no row matches, it issues none: a mutation
// rewrites every part it touches, and most deletions (a new meter's
// backfill) find nothing. It waits for the mutations issued from its own on, not
// for older ones still unfinished: one that never finishes (a failing
// UPDATE an operator issued) would hold every deletion up for good, though
// it holds this one up only where it shares parts with it (a part takes
// its mutations in order), which is then the caller's deadline to end.
func (s *Store) deleteWhere(ctx context.Context, where string) error {
	var found uint64
	if err := s.conn.QueryRow(ctx, "SELECT count() FROM (SELECT 1 FROM usage_rollups WHERE "+where+" LIMIT 1)").Scan(&found); err != nil {
		return fmt.Errorf("find rollups to delete: %w", err)
	}
	if found == 0 {
		return nil
	}
	const pendingSQL = `SELECT mutation_id FROM system.mutations
		WHERE database = currentDatabase() AND table = 'usage_rollups' AND is_done = 0`
	older := map[string]bool{}
	ids, err := s.strings(ctx, pendingSQL)
	if err != nil {
		return fmt.Errorf("list the rollup mutations: %w", err)
	}
	for _, id := range ids {
		older[id] = true
	}
	if err := s.conn.Exec(ctx, "ALTER TABLE usage_rollups DELETE WHERE "+where); err != nil {
		return fmt.Errorf("delete rollups: %w", err)
	}
	for {
		ids, err := s.strings(ctx, pendingSQL)
		if err != nil {
			return fmt.Errorf("wait for the rollup deletion: %w", err)
		}
		if !slices.ContainsFunc(ids, func(id string) bool { return !older[id] }) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for the rollup deletion (a ClickHouse mutation; system.mutations says why one is stuck): %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// strings runs a query of one string column.
func (s *Store) strings(ctx context.Context, sql string, args ...any) ([]string, error) {
	rows, err := s.conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Accounts lists accounts with raw events in [from, to).
func (s *Store) Accounts(ctx context.Context, from, to time.Time) ([]string, error) {
	out, err := s.strings(ctx, "SELECT DISTINCT account_id FROM usage_events WHERE timestamp >= ? AND timestamp < ? ORDER BY account_id",
		from.UTC(), to.UTC())
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	return out, nil
}

// EventRange is the first and last event time in the raw table.
func (s *Store) EventRange(ctx context.Context) (time.Time, time.Time, bool, error) {
	var n uint64
	var first, last time.Time
	if err := s.conn.QueryRow(ctx, "SELECT count(), min(timestamp), max(timestamp) FROM usage_events").Scan(&n, &first, &last); err != nil {
		return time.Time{}, time.Time{}, false, fmt.Errorf("raw event range: %w", err)
	}
	return first, last, n > 0, nil
}

// Usage reads rollup rows, exact through FINAL.
func (s *Store) Usage(ctx context.Context, q aggregator.UsageQuery) ([]aggregator.UsageRow, error) {
	where := `account_id = ? AND environment = ? AND meter = ? AND granularity = ?
        AND window_start >= ? AND window_start < ?`
	args := []any{q.Account, q.Environment, q.Meter, string(q.Granularity), q.From.UTC(), q.To.UTC()}
	// A page starts after the last row of the one before, by the order the
	// rows come in (ClickHouse compares arrays as it sorts them). The tuple
	// comparison does not narrow the primary key range ClickHouse reads, so
	// the page's first window bounds window_start as well: without it every
	// page read the whole range again.
	after := func(string) string { return "" }
	var afterArgs []any
	if q.After != nil {
		group := q.After.Group
		if group == nil {
			group = []string{}
		}
		where += ` AND window_start >= ?`
		args = append(args, q.After.WindowStart.UTC())
		after = func(col string) string { return " AND (window_start, " + col + ") > (?, ?)" }
		afterArgs = []any{q.After.WindowStart.UTC(), group}
	}
	var sql string
	switch {
	case !q.Grouped:
		sql = `SELECT window_start, group_values, value, events FROM usage_rollups FINAL
            WHERE ` + where + ` AND empty(group_values)` + after("group_values") + `
            ORDER BY window_start, group_values LIMIT ?`
		args = append(args, afterArgs...)
	case q.Pick == nil:
		sql = `SELECT window_start, group_values, value, events FROM usage_rollups FINAL
            WHERE ` + where + ` AND notEmpty(group_values)` + after("group_values") + `
            ORDER BY window_start, group_values LIMIT ?`
		args = append(args, afterArgs...)
	default:
		if q.Combine != "sum" && q.Combine != "max" {
			return nil, fmt.Errorf("usage: cannot combine groups with %q", q.Combine)
		}
		picks := make([]string, len(q.Pick))
		for i, p := range q.Pick {
			picks[i] = "group_values[" + strconv.Itoa(p+1) + "]"
		}
		having := ""
		if q.After != nil {
			having = " HAVING" + strings.TrimPrefix(after("g"), " AND")
		}
		combined := "toInt64(max(value))"
		if q.Combine == "sum" {
			combined = sumOfValues
		}
		sql = `SELECT window_start, [` + strings.Join(picks, ", ") + `] AS g, ` + combined + `, sum(events)
            FROM usage_rollups FINAL
            WHERE ` + where + ` AND notEmpty(group_values)
            GROUP BY window_start, g` + having + `
            ORDER BY window_start, g LIMIT ?`
		args = append(args, afterArgs...)
	}
	args = append(args, uint64(q.Limit))
	rows, err := s.conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("read usage: %w", err)
	}
	defer rows.Close()
	var out []aggregator.UsageRow
	for rows.Next() {
		var r aggregator.UsageRow
		if err := rows.Scan(&r.WindowStart, &r.Group, &r.Value, &r.Events); err != nil {
			return nil, fmt.Errorf("read usage: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Requests reads a key's recent raw events, newest first.
//
// key_id is not in the raw table's sorting key, so a read of the key's
// whole range from Since (seven days by default) reads, through FINAL, every
// event of the account in it, for each page. A page is instead read newest
// first in widening slices of event time back from its top (the cursor's
// time, or Now for a first page): the last hour, then the rest of the last
// day, then the rest of the range, stopping as soon as the page is full. The
// slices split the range by event time, in order, so their rows in turn are
// the rows one read of the whole range would return.
func (s *Store) Requests(ctx context.Context, q aggregator.RequestsQuery) ([]aggregator.RequestRow, error) {
	top := q.Now
	if q.BeforeMicros > 0 {
		top = time.UnixMicro(int64(q.BeforeMicros))
	}
	var out []aggregator.RequestRow
	var upper time.Time // the slice before's lower bound; none for the first
	for _, back := range []time.Duration{time.Hour, 24 * time.Hour, 0} {
		lower := q.Since
		if back > 0 && !top.IsZero() {
			if l := top.Add(-back).Truncate(time.Second); l.After(q.Since) {
				lower = l
			}
		}
		rows, err := s.requests(ctx, q, lower, upper, q.Limit-len(out))
		if err != nil {
			return nil, err
		}
		out = append(out, rows...)
		if len(out) >= q.Limit || lower.Equal(q.Since) {
			return out, nil
		}
		upper = lower
	}
	return out, nil
}

// requests reads up to limit of the key's events with event time in
// [from, to) (to zero: no end), newest first.
func (s *Store) requests(ctx context.Context, q aggregator.RequestsQuery, from, to time.Time, limit int) ([]aggregator.RequestRow, error) {
	sql := `SELECT event_id, timestamp_us, event_type, route, method, status, latency_us, request_bytes,
        response_bytes, units, request_id
        FROM usage_events FINAL
        WHERE account_id = ? AND environment = ? AND key_id = ? AND timestamp >= ?`
	args := []any{q.Account, q.Environment, q.KeyID, from.UTC()}
	if from.Nanosecond() != 0 {
		// timestamp holds whole seconds: a since of …:00.5 bound to it
		// alone took in the second's events before it.
		sql += ` AND timestamp_us >= ?`
		args = append(args, uint64(from.UnixMicro()))
	}
	if !to.IsZero() {
		sql += ` AND timestamp < ?`
		args = append(args, to.UTC())
	}
	if q.BeforeMicros > 0 {
		sql += ` AND (timestamp_us < ? OR (timestamp_us = ? AND (event_id < toUUID(?)
            OR (event_id = toUUID(?) AND event_type < ?))))`
		args = append(args, q.BeforeMicros, q.BeforeMicros, q.BeforeID.String(), q.BeforeID.String(), q.BeforeType)
	}
	sql += ` ORDER BY timestamp_us DESC, event_id DESC, event_type DESC LIMIT ?`
	args = append(args, uint64(limit))
	rows, err := s.conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("read requests: %w", err)
	}
	defer rows.Close()
	var out []aggregator.RequestRow
	for rows.Next() {
		var r aggregator.RequestRow
		if err := rows.Scan(&r.EventID, &r.TimeMicros, &r.Type, &r.Route, &r.Method, &r.Status, &r.LatencyMicros,
			&r.RequestBytes, &r.ResponseBytes, &r.Units, &r.RequestID); err != nil {
			return nil, fmt.Errorf("read requests: %w", err)
		}
		r.Time = time.UnixMicro(int64(r.TimeMicros)).UTC()
		out = append(out, r)
	}
	return out, rows.Err()
}

// TooLate counts events refused for lateness and not counted. A too-late
// copy that landed before an on-time copy of the same event (the same id,
// type and second) was counted by that copy, so it is no late event:
// ingest leaves out a too-late copy of an event already counted when it
// lands, and this leaves out one counted after it.
//
// The late rows are counted first: most accounts have none, and the usage
// API asks every second. Only when there are some are their own keys looked
// up in usage_events, narrowed by the sorting key's prefix and the time
// span, never the account's whole raw history.
func (s *Store) TooLate(ctx context.Context, account, env string, from, to time.Time) (uint64, error) {
	var n uint64
	err := s.conn.QueryRow(ctx, `SELECT count() FROM late_events FINAL
        WHERE account_id = ? AND environment = ? AND timestamp >= ? AND timestamp < ?`,
		account, env, from.UTC(), to.UTC()).Scan(&n)
	if err != nil || n == 0 {
		if err != nil {
			return 0, fmt.Errorf("count late events: %w", err)
		}
		return 0, nil
	}
	err = s.conn.QueryRow(ctx, `SELECT count() FROM late_events FINAL
        WHERE account_id = ? AND environment = ? AND timestamp >= ? AND timestamp < ?
          AND (event_type, timestamp, event_id) NOT IN (
            SELECT event_type, timestamp, event_id FROM usage_events
            WHERE account_id = ? AND environment = ? AND timestamp >= ? AND timestamp < ?
              AND (event_type, timestamp, event_id) IN (
                SELECT event_type, timestamp, event_id FROM late_events
                WHERE account_id = ? AND environment = ? AND timestamp >= ? AND timestamp < ?))`,
		account, env, from.UTC(), to.UTC(), account, env, from.UTC(), to.UTC(), account, env, from.UTC(), to.UTC()).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count late events: %w", err)
	}
	return n, nil
}

// CompleteThrough is min(watermark) over the partitions: the landed
// watermark, which the usage API caps by the edges' spool holds.
func (s *Store) CompleteThrough(ctx context.Context) (time.Time, bool, error) {
	var n uint64
	var w time.Time
	if err := s.conn.QueryRow(ctx, "SELECT count(), min(watermark) FROM watermarks FINAL").Scan(&n, &w); err != nil {
		return time.Time{}, false, fmt.Errorf("read watermarks: %w", err)
	}
	return w, n > 0, nil
}
