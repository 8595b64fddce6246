package clickhouse

import (
	"context"
	"fmt"
	"math"
	"reflect"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestOnePassEqualsOneQueryPerMeter checks the -If rewrite of every
// aggregation against the plain per-meter query over the same events.
func TestOnePassEqualsOneQueryPerMeter(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	p := invoicer.Period{Start: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)}
	b, err := ch.Conn.PrepareBatch(ctx, `INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
		event_type, timestamp, timestamp_us, route, status, response_bytes, units, dim_keys, dim_values, kafka_partition, kafka_offset, ingested_at)`)
	testenv.Must(t, err, "prepare")
	for i := 0; i < 500; i++ {
		at := p.Start.Add(time.Duration(i) * time.Hour)
		typ := []string{"api_call", "api_call", "job.run"}[i%3]
		acct := []string{"acct_1", "acct_2"}[i%2]
		testenv.Must(t, b.Append(uuid.New(), uint8(1), acct, "live", "key_"+string(rune('a'+i%4)), typ, at, uint64(at.UnixMicro()),
			[]string{"/a", "/b"}[i%2], uint16(200+i%3*100), uint64(i*7), int64(i%5), []string{"region"}, []string{[]string{"eu", "us"}[i%2]},
			int32(0), int64(i), time.Now().UTC()), "append")
	}
	// acct_3's units add up past Int64 (stored as such, past the bounds
	// validation puts on new events): ten of 10^18. Its sum must not wrap.
	for i := 0; i < 10; i++ {
		at := p.Start.Add(time.Duration(i) * time.Hour)
		testenv.Must(t, b.Append(uuid.New(), uint8(1), "acct_3", "live", "key_x", "api_call", at, uint64(at.UnixMicro()),
			"/a", uint16(200), uint64(1), int64(1e18), []string{"region"}, []string{"eu"}, int32(0), int64(1000+i), time.Now().UTC()), "append")
	}
	testenv.Must(t, b.Send(), "insert")
	meters := []meter.Meter{
		meter.Default(),
		{Key: "units", EventType: "api_call", Aggregation: meter.Sum, Value: "units"},
		{Key: "biggest", EventType: "api_call", Aggregation: meter.Max, Value: "response_bytes"},
		{Key: "last_units", EventType: "job.run", Aggregation: meter.Latest, Value: "units"},
		{Key: "keys", EventType: "api_call", Aggregation: meter.UniqueCount, Value: "key_id"},
		{Key: "eu_ok", EventType: "api_call", Aggregation: meter.Count, Filters: []meter.Filter{
			{Property: "dimensions.region", Values: []string{"eu"}}, {Property: "status", Values: []string{"500"}, Not: true}}},
	}
	u := New(ch.Conn)
	in, _ := accountFilter([]string{"acct_1", "acct_2", "acct_3"})
	one, err := u.read(ctx, in, p, meters, schemas.Live, "FINAL")
	testenv.Must(t, err, "one pass")
	per, err := u.readPerMeter(ctx, in, p, meters, schemas.Live, "FINAL")
	testenv.Must(t, err, "per meter")
	for _, a := range []string{"acct_1", "acct_2", "acct_3"} {
		if one[a].Events != map[string]int64{"acct_1": 250, "acct_2": 250, "acct_3": 10}[a] || !reflect.DeepEqual(one[a], per[a]) {
			t.Errorf("%s: one pass %+v, per meter %+v", a, one[a], per[a])
		}
	}
	if got := one["acct_3"].Quantities["units"]; got != math.MaxInt64 || !meter.Overflowed(got) {
		t.Errorf("acct_3: units %d from ten events of 10^18, want Int64's largest value, the mark of a sum past Int64", got)
	}
}

// readPerMeter is the reference the one pass is checked against: it groups
// by account and by whether the event matches the meter, one query per
// meter, with each meter's plain aggregate.
func (u *Usage) readPerMeter(ctx context.Context, filter string, p invoicer.Period, meters []meter.Meter, env schemas.Environment, final string) (map[string]invoicer.AccountUsage, error) {
	out := map[string]invoicer.AccountUsage{}
	for i, m := range meters {
		c, err := m.Compile()
		if err != nil {
			return nil, fmt.Errorf("compile meter %s: %w", m.Key, err)
		}
		q := fmt.Sprintf(`SELECT account_id, toUInt8(%s) AS matched, toInt64(count()) AS events, %s AS quantity
			FROM usage_events %s
			WHERE environment = ? AND timestamp >= toDateTime(?) AND timestamp < toDateTime(?) AND %s
			GROUP BY account_id, matched`, c.Where, c.Aggregate, final, filter)
		args := append(append([]any{}, c.Args...), string(env), uint32(p.Start.Unix()), uint32(p.End.Unix()))
		rows, err := u.conn.Query(ctx, q, args...)
		if err != nil {
			return nil, fmt.Errorf("read usage of meter %s: %w", m.Key, err)
		}
		for rows.Next() {
			var acct string
			var matched uint8
			var events, qty int64
			if err := rows.Scan(&acct, &matched, &events, &qty); err != nil {
				rows.Close()
				return nil, fmt.Errorf("read usage of meter %s: %w", m.Key, err)
			}
			au, ok := out[acct]
			if !ok {
				au = invoicer.AccountUsage{Quantities: make(map[string]int64, len(meters))}
				for _, m := range meters {
					au.Quantities[m.Key] = 0
				}
			}
			if i == 0 {
				au.Events += events
			}
			if matched == 1 {
				au.Quantities[m.Key] = qty
			}
			out[acct] = au
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return nil, fmt.Errorf("read usage of meter %s: %w", m.Key, err)
		}
	}
	return out, nil
}
