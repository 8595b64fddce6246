// Package clickhouse computes rollups from the raw events table and reads
// them for the usage API.
package clickhouse

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/aggregator"
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

// rollupSQL builds the INSERT … SELECT that recomputes windows of one meter
// and granularity from usage_events FINAL. scanFrom/scanTo bound the raw
// scan on the primary key; windowFilter selects the windows to write.
func rollupSQL(c meter.Compiled, m meter.Meter, g aggregator.Granularity, zone string, accounts []string,
	scanFrom, scanTo time.Time, windowFilter string) string {
	w := windowExpr(g, zone, "timestamp")
	groups := "[emptyArrayString()]"
	if len(c.GroupBy) > 0 {
		groups = "[emptyArrayString(), [" + strings.Join(c.GroupBy, ", ") + "]]"
	}
	qa := make([]string, len(accounts))
	for i, a := range accounts {
		qa[i] = quote(a)
	}
	return fmt.Sprintf(`INSERT INTO usage_rollups (account_id, environment, meter, granularity, window_start, group_values, value, events, computed_at)
SELECT account_id, environment, %s, %s, window_start, group_values, %s, count(), now()
FROM (
    SELECT *, %s AS window_start, arrayJoin(%s) AS group_values
    FROM usage_events FINAL
    WHERE account_id IN (%s) AND timestamp >= %s AND timestamp < %s AND (%s) AND (%s)
)
GROUP BY account_id, environment, window_start, group_values`,
		quote(m.Key), quote(string(g)), c.Aggregate, w, groups, strings.Join(qa, ", "),
		dt(scanFrom), dt(scanTo), c.Where, windowFilter)
}

// Recompute rewrites every window of r.Granularity holding a touched minute.
func (s *Store) Recompute(ctx context.Context, r aggregator.Recompute) error {
	if len(r.Touched) == 0 {
		return nil
	}
	if !zoneRe.MatchString(r.Zone) {
		return fmt.Errorf("time zone %q: not a valid IANA name", r.Zone)
	}
	c, err := r.Meter.Compile()
	if err != nil {
		return err
	}
	accounts := map[string]struct{}{}
	var acc []string
	tuples := make([]string, 0, len(r.Touched))
	lo, hi := r.Touched[0].Minute, r.Touched[0].Minute
	for _, t := range r.Touched {
		if _, ok := accounts[t.Account]; !ok {
			accounts[t.Account] = struct{}{}
			acc = append(acc, t.Account)
		}
		tuples = append(tuples, fmt.Sprintf("(%s, %s, %d)", quote(t.Account), quote(string(t.Environment)), t.Minute.Unix()))
		if t.Minute.Before(lo) {
			lo = t.Minute
		}
		if t.Minute.After(hi) {
			hi = t.Minute
		}
	}
	span := spanOf(r.Granularity)
	filter := fmt.Sprintf(`(account_id, toString(environment), window_start) IN (
        SELECT tupleElement(t, 1), tupleElement(t, 2), %s
        FROM (SELECT arrayJoin([%s]) AS t))`,
		windowExpr(r.Granularity, r.Zone, "toDateTime(tupleElement(t, 3), 'UTC')"), strings.Join(tuples, ", "))
	q := rollupSQL(c, r.Meter, r.Granularity, r.Zone, acc, lo.Add(-span), hi.Add(span+time.Minute), filter)
	if err := s.conn.Exec(ctx, q, c.Args...); err != nil {
		return fmt.Errorf("recompute %s %s rollups: %w", r.Meter.Key, r.Granularity, err)
	}
	return nil
}

// Rebuild rewrites every window of r.Granularity that starts in [From, To).
func (s *Store) Rebuild(ctx context.Context, r aggregator.Rebuild) error {
	if len(r.Accounts) == 0 {
		return nil
	}
	if !zoneRe.MatchString(r.Zone) {
		return fmt.Errorf("time zone %q: not a valid IANA name", r.Zone)
	}
	c, err := r.Meter.Compile()
	if err != nil {
		return err
	}
	filter := fmt.Sprintf("window_start >= %s AND window_start < %s", dt(r.From), dt(r.To))
	q := rollupSQL(c, r.Meter, r.Granularity, r.Zone, r.Accounts, r.From, r.To.Add(spanOf(r.Granularity)), filter)
	if err := s.conn.Exec(ctx, q, c.Args...); err != nil {
		return fmt.Errorf("rebuild %s %s rollups: %w", r.Meter.Key, r.Granularity, err)
	}
	return nil
}

// spanOf bounds a window's length (a month is at most 31 days, a day at
// most 25 hours across a daylight-saving change).
func spanOf(g aggregator.Granularity) time.Duration {
	switch g {
	case aggregator.Minute:
		return time.Minute
	case aggregator.Hour:
		return time.Hour
	case aggregator.Day:
		return 25 * time.Hour
	default:
		return 32 * 24 * time.Hour
	}
}

// Accounts lists accounts with raw events in [from, to).
func (s *Store) Accounts(ctx context.Context, from, to time.Time) ([]string, error) {
	rows, err := s.conn.Query(ctx, "SELECT DISTINCT account_id FROM usage_events WHERE timestamp >= ? AND timestamp < ? ORDER BY account_id",
		from.UTC(), to.UTC())
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var a string
		if err := rows.Scan(&a); err != nil {
			return nil, fmt.Errorf("list accounts: %w", err)
		}
		out = append(out, a)
	}
	return out, rows.Err()
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
	var sql string
	switch {
	case !q.Grouped:
		sql = `SELECT window_start, group_values, value, events FROM usage_rollups FINAL
            WHERE ` + where + ` AND empty(group_values)
            ORDER BY window_start, group_values LIMIT ? OFFSET ?`
	case q.Pick == nil:
		sql = `SELECT window_start, group_values, value, events FROM usage_rollups FINAL
            WHERE ` + where + ` AND notEmpty(group_values)
            ORDER BY window_start, group_values LIMIT ? OFFSET ?`
	default:
		if q.Combine != "sum" && q.Combine != "max" {
			return nil, fmt.Errorf("usage: cannot combine groups with %q", q.Combine)
		}
		picks := make([]string, len(q.Pick))
		for i, p := range q.Pick {
			picks[i] = "group_values[" + strconv.Itoa(p+1) + "]"
		}
		sql = `SELECT window_start, [` + strings.Join(picks, ", ") + `] AS g, toInt64(` + q.Combine + `(value)), sum(events)
            FROM usage_rollups FINAL
            WHERE ` + where + ` AND notEmpty(group_values)
            GROUP BY window_start, g
            ORDER BY window_start, g LIMIT ? OFFSET ?`
	}
	args = append(args, uint64(q.Limit), uint64(q.Offset))
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
func (s *Store) Requests(ctx context.Context, q aggregator.RequestsQuery) ([]aggregator.RequestRow, error) {
	sql := `SELECT event_id, timestamp_us, event_type, route, method, status, latency_us, request_bytes,
        response_bytes, units, request_id
        FROM usage_events FINAL
        WHERE account_id = ? AND environment = ? AND key_id = ? AND timestamp >= ?`
	args := []any{q.Account, q.Environment, q.KeyID, q.Since.UTC()}
	if q.BeforeMicros > 0 {
		sql += ` AND (timestamp_us < ? OR (timestamp_us = ? AND event_id < toUUID(?)))`
		args = append(args, q.BeforeMicros, q.BeforeMicros, q.BeforeID.String())
	}
	sql += ` ORDER BY timestamp_us DESC, event_id DESC LIMIT ?`
	args = append(args, uint64(q.Limit))
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

// TooLate counts events refused for lateness.
func (s *Store) TooLate(ctx context.Context, account, env string, from, to time.Time) (uint64, error) {
	var n uint64
	err := s.conn.QueryRow(ctx, `SELECT count() FROM late_events FINAL
        WHERE account_id = ? AND environment = ? AND timestamp >= ? AND timestamp < ?`,
		account, env, from.UTC(), to.UTC()).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count late events: %w", err)
	}
	return n, nil
}

// CompleteThrough is min(watermark) over the partitions.
func (s *Store) CompleteThrough(ctx context.Context) (time.Time, bool, error) {
	var n uint64
	var w time.Time
	if err := s.conn.QueryRow(ctx, "SELECT count(), min(watermark) FROM watermarks FINAL").Scan(&n, &w); err != nil {
		return time.Time{}, false, fmt.Errorf("read watermarks: %w", err)
	}
	return w, n > 0, nil
}
