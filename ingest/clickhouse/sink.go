// Package clickhouse writes usage events to the raw events table, too-late
// events to late_events and partition watermarks to watermarks.
package clickhouse

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/tollgate-dev/tollgate/ingest"
)

// Sink inserts records into usage_events over the native protocol.
type Sink struct {
	conn driver.Conn
	now  func() time.Time
}

var (
	_ ingest.Sink           = (*Sink)(nil)
	_ ingest.WatermarkStore = (*Sink)(nil)
)

// NewSink returns a Sink writing through conn.
func NewSink(conn driver.Conn) *Sink { return &Sink{conn: conn, now: time.Now} }

// insertSQL names every column: ClickHouse 18.16 needs that over the native
// protocol, and it keeps the insert stable when columns are added.
const insertSQL = `INSERT INTO usage_events (event_id, schema_version, account_id, environment, key_id,
 event_type, timestamp, timestamp_us, route, method, status, latency_us, request_bytes, response_bytes,
 units, request_id, client_id, dim_keys, dim_values, kafka_partition, kafka_offset, ingested_at)`

// Insert writes records in one INSERT, built column by column: one
// conversion per column instead of one reflective append per row. The
// rows go to the server in blocks of blockRows, each flushed before the
// next is filled: the client's column buffers are emptied, not freed, by a
// flush, and so are this side's, so both grow to one block's size once per
// INSERT and are reused for its later blocks. Columns of a whole batch,
// built fresh for every INSERT, were tens of megabytes of new memory each
// time, and the page faults of touching it cost more CPU than filling it.
// The server squashes an INSERT's blocks into one part
// (min_insert_block_size_rows), so the table gets no more parts for it. An
// INSERT cut off halfway may leave some blocks written; the batch is then
// retried whole and its repeats counted once, like any redelivery
// (docs/ingest.md).
func (s *Sink) Insert(ctx context.Context, groups ...[]ingest.Record) error {
	b, err := s.conn.PrepareBatch(ctx, insertSQL)
	if err != nil {
		return fmt.Errorf("prepare insert: %w", err)
	}
	defer b.Abort()
	n := 0
	for _, g := range groups {
		n += len(g)
	}
	c := newRawColumns(min(n, blockRows), s.now().UTC().Truncate(time.Second))
	sent := 0
	for _, g := range groups {
		for i := range g {
			c.add(&g[i])
			if len(c.ids) < blockRows {
				continue
			}
			if err := c.appendTo(b); err != nil {
				return err
			}
			if sent += len(c.ids); sent < n {
				if err := b.Flush(); err != nil {
					return fmt.Errorf("insert raw events: %w", err)
				}
			}
			c.reset()
		}
	}
	if len(c.ids) > 0 {
		if err := c.appendTo(b); err != nil {
			return err
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert raw events: %w", err)
	}
	return nil
}

// appendTo appends the block's rows to b's columns.
func (c *rawColumns) appendTo(b driver.Batch) error {
	for i, col := range c.columns() {
		if err := appendColumn(b.Column(i), col); err != nil {
			return fmt.Errorf("append column %d of the raw events: %w", i, err)
		}
	}
	return nil
}

// rawColumns holds one block of usage_events, in insertSQL's column order.
type rawColumns struct {
	ids                                   []uuid.UUID
	versions                              []uint8
	accounts, envs, keys, types           []string
	times, ingested                       []time.Time
	micros, latency, reqBytes, respBytes  []uint64
	routes, methods, requestIDs, clientID []string
	statuses                              []uint16
	units, offsets                        []int64
	dimKeys, dimValues                    [][]string
	partitions                            []int32
	at                                    time.Time
}

func newRawColumns(n int, at time.Time) *rawColumns {
	return &rawColumns{
		ids: make([]uuid.UUID, 0, n), versions: make([]uint8, 0, n), accounts: make([]string, 0, n),
		envs: make([]string, 0, n), keys: make([]string, 0, n), types: make([]string, 0, n),
		times: make([]time.Time, 0, n), micros: make([]uint64, 0, n), routes: make([]string, 0, n),
		methods: make([]string, 0, n), statuses: make([]uint16, 0, n), latency: make([]uint64, 0, n),
		reqBytes: make([]uint64, 0, n), respBytes: make([]uint64, 0, n), units: make([]int64, 0, n),
		requestIDs: make([]string, 0, n), clientID: make([]string, 0, n), dimKeys: make([][]string, 0, n),
		dimValues: make([][]string, 0, n), partitions: make([]int32, 0, n), offsets: make([]int64, 0, n),
		ingested: make([]time.Time, 0, n), at: at,
	}
}

func (c *rawColumns) add(r *ingest.Record) {
	e := &r.Event
	dk, dv := r.DimensionArrays()
	c.ids = append(c.ids, e.ID)
	c.versions = append(c.versions, uint8(e.Version))
	c.accounts = append(c.accounts, e.AccountID)
	c.envs = append(c.envs, string(e.Environment))
	c.keys = append(c.keys, e.KeyID)
	c.types = append(c.types, e.Type)
	c.times = append(c.times, e.Time.UTC())
	c.micros = append(c.micros, uint64(e.Time.UnixMicro()))
	c.routes = append(c.routes, e.Route)
	c.methods = append(c.methods, e.Method)
	c.statuses = append(c.statuses, uint16(e.Status))
	c.latency = append(c.latency, uint64(e.LatencyMicros))
	c.reqBytes = append(c.reqBytes, uint64(e.RequestBytes))
	c.respBytes = append(c.respBytes, uint64(e.ResponseBytes))
	c.units = append(c.units, e.Units)
	c.requestIDs = append(c.requestIDs, e.RequestID)
	c.clientID = append(c.clientID, e.ClientID)
	c.dimKeys = append(c.dimKeys, dk)
	c.dimValues = append(c.dimValues, dv)
	c.partitions = append(c.partitions, int32(r.Partition))
	c.offsets = append(c.offsets, r.Offset)
	c.ingested = append(c.ingested, c.at)
}

// appendColumn appends a column's rows. An array column's rows go one by
// one: the client's Append of a whole [][]string walks it by reflection,
// while AppendRow of one []string takes a typed path.
func appendColumn(c driver.BatchColumn, col any) error {
	arrays, ok := col.([][]string)
	if !ok {
		return c.Append(col)
	}
	for _, a := range arrays {
		if err := c.AppendRow(a); err != nil {
			return err
		}
	}
	return nil
}

// blockRows is the rows of one block of an INSERT (Insert).
const blockRows = 4096

// columns lists the block's columns, in insertSQL's order.
func (c *rawColumns) columns() []any {
	return []any{c.ids, c.versions, c.accounts, c.envs, c.keys, c.types, c.times, c.micros, c.routes,
		c.methods, c.statuses, c.latency, c.reqBytes, c.respBytes, c.units, c.requestIDs, c.clientID,
		c.dimKeys, c.dimValues, c.partitions, c.offsets, c.ingested}
}

// reset empties the block for the next one, keeping its memory. The
// strings and arrays it referred to are left for the next rows to
// overwrite: they are the batch's, which outlives the INSERT.
func (c *rawColumns) reset() {
	c.ids, c.versions, c.accounts, c.envs, c.keys = c.ids[:0], c.versions[:0], c.accounts[:0], c.envs[:0], c.keys[:0]
	c.types, c.times, c.micros, c.routes, c.methods = c.types[:0], c.times[:0], c.micros[:0], c.routes[:0], c.methods[:0]
	c.statuses, c.latency, c.reqBytes, c.respBytes = c.statuses[:0], c.latency[:0], c.reqBytes[:0], c.respBytes[:0]
	c.units, c.requestIDs, c.clientID, c.dimKeys = c.units[:0], c.requestIDs[:0], c.clientID[:0], c.dimKeys[:0]
	c.dimValues, c.partitions, c.offsets, c.ingested = c.dimValues[:0], c.partitions[:0], c.offsets[:0], c.ingested[:0]
}

const insertLateSQL = `INSERT INTO late_events (event_id, account_id, environment, key_id, event_type,
 timestamp, timestamp_us, units, record_time, kafka_partition, kafka_offset, payload, ingested_at)`

// InsertLate writes events that came after the allowed lateness, whole,
// and returns them, except a too-late copy of an event usage_events
// already counts (the same id, type and second: the raw table's own
// duplicate), which is a duplicate, not a late event, and is left out.
func (s *Sink) InsertLate(ctx context.Context, records []ingest.Record) ([]ingest.Record, error) {
	counted, err := s.counted(ctx, records)
	if err != nil {
		return nil, err
	}
	kept := make([]ingest.Record, 0, len(records))
	for _, r := range records {
		if !counted[rowOf(r)] {
			kept = append(kept, r)
		}
	}
	if len(kept) == 0 {
		return kept, nil
	}
	b, err := s.conn.PrepareBatch(ctx, insertLateSQL)
	if err != nil {
		return nil, fmt.Errorf("prepare late insert: %w", err)
	}
	defer b.Abort()
	at := s.now().UTC().Truncate(time.Second)
	for _, r := range kept {
		e := r.Event
		if err := b.Append(e.ID, e.AccountID, string(e.Environment), e.KeyID, e.Type, e.Time.UTC(),
			uint64(e.Time.UnixMicro()), e.Units, r.RecordTime.UTC(), int32(r.Partition), r.Offset,
			string(r.Value), at); err != nil {
			return nil, fmt.Errorf("append late event %s: %w", e.ID, err)
		}
	}
	if err := b.Send(); err != nil {
		return nil, fmt.Errorf("insert late events: %w", err)
	}
	return kept, nil
}

// row is a raw row's identity: usage_events' sorting key, whose repeats
// count once.
type row struct {
	account, env, typ, id string
	second                int64
}

func rowOf(r ingest.Record) row {
	e := r.Event
	return row{account: e.AccountID, env: string(e.Environment), typ: e.Type, id: e.ID.String(), second: e.Time.Unix()}
}

// countedChunk is how many event ids one lookup names: 1,000 keeps its
// text near 40 KB, well under ClickHouse's max_query_size (256 KiB).
// countedSpan is the most event time one lookup covers.
const (
	countedChunk = 1000
	countedSpan  = 24 * time.Hour
)

// counted reads which of records usage_events already holds. Too-late
// events are rare, so this costs a query or a few per batch that has any.
// Each names one account environment and event type, its ids and at most
// a day of event time, so the table's sorting key (account, environment,
// type, timestamp, id) narrows it to the granules of that day: a backfill
// of a year of old events reads each day once, not the account's year
// per thousand ids.
func (s *Sink) counted(ctx context.Context, records []ingest.Record) (map[row]bool, error) {
	type scope struct{ account, env, typ string }
	groups := map[scope][]ingest.Record{}
	for _, r := range records {
		k := scope{r.Event.AccountID, string(r.Event.Environment), r.Event.Type}
		groups[k] = append(groups[k], r)
	}
	out := map[row]bool{}
	for k, rs := range groups {
		sort.Slice(rs, func(i, j int) bool { return rs[i].Event.Time.Before(rs[j].Event.Time) })
		for len(rs) > 0 {
			from := rs[0].Event.Time.UTC().Truncate(time.Second)
			n := 1
			for n < len(rs) && n < countedChunk && rs[n].Event.Time.Sub(from) < countedSpan {
				n++
			}
			chunk := rs[:n]
			rs = rs[n:]
			args := []any{k.account, k.env, k.typ, from, chunk[n-1].Event.Time.UTC().Truncate(time.Second)}
			for _, r := range chunk {
				args = append(args, r.Event.ID.String())
			}
			q := `SELECT toString(event_id), toUInt32(timestamp) FROM usage_events
                WHERE account_id = ? AND environment = ? AND event_type = ? AND timestamp >= ? AND timestamp <= ?
                AND event_id IN (?` + strings.Repeat(", ?", n-1) + `)`
			if err := s.readCounted(ctx, q, args, k.account, k.env, k.typ, out); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

func (s *Sink) readCounted(ctx context.Context, q string, args []any, account, env, typ string, out map[row]bool) error {
	rows, err := s.conn.Query(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("look up late events' earlier copies: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var sec uint32
		if err := rows.Scan(&id, &sec); err != nil {
			return fmt.Errorf("look up late events' earlier copies: %w", err)
		}
		out[row{account: account, env: env, typ: typ, id: id, second: int64(sec)}] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("look up late events' earlier copies: %w", err)
	}
	return nil
}

// Watermarks reads the current watermark of every partition.
func (s *Sink) Watermarks(ctx context.Context) (map[int]time.Time, error) {
	rows, err := s.conn.Query(ctx, "SELECT partition, watermark FROM watermarks FINAL")
	if err != nil {
		return nil, fmt.Errorf("read watermarks: %w", err)
	}
	defer rows.Close()
	out := map[int]time.Time{}
	for rows.Next() {
		var p int32
		var w time.Time
		if err := rows.Scan(&p, &w); err != nil {
			return nil, fmt.Errorf("read watermarks: %w", err)
		}
		out[int(p)] = w
	}
	return out, rows.Err()
}

// WatermarkSource reads the topic and group the watermarks are of.
func (s *Sink) WatermarkSource(ctx context.Context) (topic, group string, err error) {
	rows, err := s.conn.Query(ctx, "SELECT topic, consumer_group FROM watermark_source FINAL")
	if err != nil {
		return "", "", fmt.Errorf("read the watermarks' source: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		if err := rows.Scan(&topic, &group); err != nil {
			return "", "", fmt.Errorf("read the watermarks' source: %w", err)
		}
	}
	if err := rows.Err(); err != nil {
		return "", "", fmt.Errorf("read the watermarks' source: %w", err)
	}
	return topic, group, nil
}

// SetWatermarkSource records the topic and group the watermarks are of.
func (s *Sink) SetWatermarkSource(ctx context.Context, topic, group string, at time.Time) error {
	b, err := s.conn.PrepareBatch(ctx, "INSERT INTO watermark_source (topic, consumer_group, updated_at)")
	if err != nil {
		return fmt.Errorf("record the watermarks' source: %w", err)
	}
	defer b.Abort()
	if err := b.Append(topic, group, at.UTC()); err != nil {
		return fmt.Errorf("record the watermarks' source: %w", err)
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("record the watermarks' source: %w", err)
	}
	return nil
}

// ResetWatermarks sets partitions' watermarks to the epoch and removes the
// others' (a mutation, which ClickHouse applies in the background; until
// then their rows stand, above the epoch the others hold).
func (s *Sink) ResetWatermarks(ctx context.Context, partitions []int, at time.Time) error {
	epoch := map[int]time.Time{}
	for _, p := range partitions {
		epoch[p] = time.Unix(0, 0).UTC()
	}
	// The last row per partition is the one with the latest updated_at: a
	// row the old source's host stamped with a clock ahead of this one's
	// would outlast the reset, so the reset is stamped after every row.
	var last time.Time
	if err := s.conn.QueryRow(ctx, "SELECT max(updated_at) FROM watermarks").Scan(&last); err != nil {
		return fmt.Errorf("read the watermarks' last update: %w", err)
	}
	if !at.After(last) {
		at = last.Add(time.Second)
	}
	if len(epoch) > 0 {
		if err := s.SetWatermarks(ctx, epoch, at); err != nil {
			return err
		}
	}
	keep := make([]string, 0, len(partitions))
	for _, p := range partitions {
		keep = append(keep, strconv.Itoa(p))
	}
	q := "ALTER TABLE watermarks DELETE WHERE 1"
	if len(keep) > 0 {
		q = "ALTER TABLE watermarks DELETE WHERE partition NOT IN (" + strings.Join(keep, ", ") + ")"
	}
	if err := s.conn.Exec(ctx, q); err != nil {
		return fmt.Errorf("remove other partitions' watermarks: %w", err)
	}
	return nil
}

// SetWatermarks writes new watermarks for some partitions.
func (s *Sink) SetWatermarks(ctx context.Context, w map[int]time.Time, at time.Time) error {
	b, err := s.conn.PrepareBatch(ctx, "INSERT INTO watermarks (partition, watermark, updated_at)")
	if err != nil {
		return fmt.Errorf("prepare watermarks: %w", err)
	}
	defer b.Abort()
	for p, t := range w {
		if err := b.Append(int32(p), t.UTC(), at.UTC()); err != nil {
			return fmt.Errorf("append watermark: %w", err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("write watermarks: %w", err)
	}
	return nil
}
