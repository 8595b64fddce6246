package clickhouse_test

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	ch "github.com/ClickHouse/clickhouse-go/v2"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// readRows runs read with query logging on and returns the rows ClickHouse
// reports its queries (all under one query id) read.
func readRows(t *testing.T, c *testenv.ClickHouse, id string, read func(ctx context.Context)) uint64 {
	t.Helper()
	ctx := ch.Context(context.Background(), ch.WithQueryID(id), ch.WithSettings(ch.Settings{"log_queries": 1}))
	read(ctx)
	// The query's log row can reach the table after a flush that ran
	// before the server wrote it: flush and look again, for a while.
	for range 100 {
		testenv.Must(t, c.Conn.Exec(context.Background(), "SYSTEM FLUSH LOGS"), "flush the query log")
		var n, found uint64
		testenv.Must(t, c.Conn.QueryRow(context.Background(),
			"SELECT count(), sum(read_rows) FROM system.query_log WHERE query_id = ? AND type = 2", id).Scan(&found, &n), "read the query log")
		if found > 0 {
			return n
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("query %s is not in system.query_log", id)
	return 0
}

// Pages follow each other exactly (no row skipped or repeated), and a page
// reads from its cursor's window on, not the whole range again.
func TestUsagePagesReadFromTheirCursor(t *testing.T) {
	c := testenv.NewClickHouse(t)
	ctx := context.Background()
	store := clickhouse.NewStore(c.Conn)
	const hours, groups = 300, 40
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	// One account's hour rows: a total per hour, and 40 groups of two
	// values (route, method) that combine to 20 routes.
	testenv.Must(t, c.Conn.Exec(ctx, fmt.Sprintf(`INSERT INTO usage_rollups
		(account_id, environment, meter, granularity, window_start, group_values, value, events, latest_us, latest_id, computed_at)
		SELECT 'acct_pages', 'live', 'api_calls', 'hour', toDateTime(%d + intDiv(number, %d) * 3600, 'UTC'),
			if(number %% %d = 0, emptyArrayString(), [concat('/r', toString(number %% 20)), concat('M', toString(number %% %d %% 2))]),
			toInt64(number %% 97 + 1), 1, 0, '', now()
		FROM system.numbers LIMIT %d`, base.Unix(), groups+1, groups+1, groups+1, hours*(groups+1))), "insert rollups")

	q := aggregator.UsageQuery{Account: "acct_pages", Environment: "live", Meter: "api_calls", Granularity: aggregator.Hour,
		From: base, To: base.Add(hours * time.Hour)}
	for _, c2 := range []struct {
		name  string
		limit int
		set   func(*aggregator.UsageQuery)
	}{
		{"totals", 50, func(*aggregator.UsageQuery) {}},
		{"groups", 1000, func(q *aggregator.UsageQuery) { q.Grouped = true }},
		{"combined groups", 1000, func(q *aggregator.UsageQuery) { q.Grouped, q.Pick, q.Combine = true, []int{0}, "sum" }},
	} {
		t.Run(c2.name+" page exactly and each page reads from its cursor", func(t *testing.T) {
			q := q
			c2.set(&q)
			q.Limit = 1 << 20
			all, err := store.Usage(ctx, q)
			testenv.Must(t, err, "read every row")
			q.Limit = c2.limit
			var paged []aggregator.UsageRow
			var lastPageRead uint64
			for page := 0; ; page++ {
				var rows []aggregator.UsageRow
				lastPageRead = readRows(t, c, fmt.Sprintf("%s-%s-%d", t.Name(), c.Database, page), func(ctx context.Context) {
					rows, err = store.Usage(ctx, q)
					testenv.Must(t, err, "read a page")
				})
				paged = append(paged, rows...)
				if len(rows) < q.Limit {
					break
				}
				last := rows[len(rows)-1]
				q.After = &aggregator.UsageRow{WindowStart: last.WindowStart, Group: last.Group}
			}
			if len(all) == 0 || !reflect.DeepEqual(paged, all) {
				t.Fatalf("pages returned %d rows, one read %d: they differ", len(paged), len(all))
			}
			// The last page's rows are at the range's end: reading from its
			// cursor is a small part of the table's hours*(groups+1) rows.
			if lastPageRead > hours*(groups+1)/4 {
				t.Fatalf("the last page read %d rows of %d: it read the range from its start", lastPageRead, hours*(groups+1))
			}
		})
	}
}
