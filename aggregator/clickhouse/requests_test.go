package clickhouse_test

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// A key's request log pages newest first across the slices of time the
// store reads it in: no event skipped or repeated, in the order one read
// of the whole range returns, whatever the page size.
func TestRequestPagesAreExactAcrossTimeSlices(t *testing.T) {
	c := testenv.NewClickHouse(t)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second).Add(400 * time.Millisecond)
	since := now.Add(-7 * 24 * time.Hour)
	var recs []ingest.Record
	add := func(key string, env schemas.Environment, at time.Time) {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: "acct_log", Environment: env, KeyID: key,
			Type: "api_call", Time: at, Route: "/r", Method: "GET", Status: 200, Units: 1}
		e.Normalize()
		recs = append(recs, ingest.Record{Event: e})
	}
	var times []time.Time
	// Around each slice boundary (an hour and a day before now), several
	// events a second, three of them at the same microsecond.
	for _, edge := range []time.Duration{time.Hour, 24 * time.Hour} {
		for s := -3; s <= 3; s++ {
			at := now.Add(-edge).Truncate(time.Second).Add(time.Duration(s) * time.Second)
			times = append(times, at, at, at, at.Add(250*time.Millisecond), at.Add(999_999*time.Microsecond))
		}
	}
	for h := 0; h < 7*24; h += 5 { // across the week
		times = append(times, now.Add(-time.Duration(h)*time.Hour-17*time.Minute))
	}
	times = append(times, now.Add(-time.Minute), now.Add(30*time.Second), // one a little in the future
		since.Add(time.Second), since.Add(-time.Second)) // and one before the range
	for _, at := range times {
		add("key_log", schemas.Live, at)
		add("key_other", schemas.Live, at.Add(time.Millisecond)) // another key of the account
		add("key_log", schemas.Test, at)                         // and the key's test mode
	}
	// The account's other traffic over the week, which key_id (not in the
	// sorting key) does not let ClickHouse skip.
	const busy = 20_000
	for i := range busy {
		add("key_other", schemas.Live, since.Add(time.Duration(i)*(7*24*time.Hour/busy)))
	}
	testenv.Must(t, chsink.NewSink(c.Conn).Insert(ctx, recs), "insert raw events")
	store := clickhouse.NewStore(c.Conn)

	q := aggregator.RequestsQuery{Account: "acct_log", Environment: "live", KeyID: "key_log", Since: since, Limit: 1 << 20}
	all, err := store.Requests(ctx, q) // no Now and no cursor: one read of the whole range
	testenv.Must(t, err, "read the whole log")
	if want := len(times) - 1; len(all) != want {
		t.Fatalf("one read of the range: %d events, want %d", len(all), want)
	}
	for i := 1; i < len(all); i++ {
		if all[i].TimeMicros > all[i-1].TimeMicros {
			t.Fatalf("one read of the range: event %d is newer than the one before it", i)
		}
	}
	t.Run("a first page of recent events reads the last hour, not the week", func(t *testing.T) {
		q := q
		q.Limit, q.Now = 10, now
		var rows []aggregator.RequestRow
		read := readRows(t, c, "requests-"+c.Database, func(ctx context.Context) {
			rows, err = store.Requests(ctx, q)
			testenv.Must(t, err, "read a page")
		})
		if !reflect.DeepEqual(rows, all[:10]) {
			t.Fatalf("first page differs from the first 10 events of one read of the range")
		}
		if read > busy/4 {
			t.Fatalf("the first page read %d rows: the account's whole week is about %d", read, busy+3*len(times))
		}
	})
	for _, limit := range []int{1, 4, 7, 50, 1000} {
		t.Run(fmt.Sprintf("pages of %d", limit), func(t *testing.T) {
			q := q
			q.Limit, q.Now = limit, now
			var paged []aggregator.RequestRow
			for range len(all) + 2 {
				rows, err := store.Requests(ctx, q)
				testenv.Must(t, err, "read a page")
				if len(rows) > limit {
					t.Fatalf("a page of %d rows, limit %d", len(rows), limit)
				}
				paged = append(paged, rows...)
				if len(rows) < limit {
					break
				}
				last := rows[len(rows)-1]
				q.BeforeMicros, q.BeforeID = last.TimeMicros, last.EventID
			}
			if !reflect.DeepEqual(paged, all) {
				t.Fatalf("pages returned %d events, one read of the range %d: they differ", len(paged), len(all))
			}
		})
	}
}
