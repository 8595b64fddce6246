package clickhouse

import (
	"context"
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
	for _, m := range meters {
		c, err := m.Compile()
		testenv.Must(t, err, "compile")
		if _, ok := conditional(c); !ok {
			t.Fatalf("meter %s: aggregate %q has no -If form", m.Key, c.Aggregate)
		}
	}
	u := New(ch.Conn)
	in, _ := accountFilter([]string{"acct_1", "acct_2"})
	one, err := u.read(ctx, in, p, meters, schemas.Live, "FINAL")
	testenv.Must(t, err, "one pass")
	per, err := u.readPerMeter(ctx, in, p, meters, schemas.Live, "FINAL")
	testenv.Must(t, err, "per meter")
	for _, a := range []string{"acct_1", "acct_2"} {
		if one[a].Events != 250 || !reflect.DeepEqual(one[a], per[a]) {
			t.Errorf("%s: one pass %+v, per meter %+v", a, one[a], per[a])
		}
	}
}
