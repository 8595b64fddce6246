// Package clickhouse writes usage events to the raw events table, too-late
// events to late_events and partition watermarks to watermarks.
package clickhouse

import (
	"context"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

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

// Insert writes records as one block.
func (s *Sink) Insert(ctx context.Context, records []ingest.Record) error {
	b, err := s.conn.PrepareBatch(ctx, insertSQL)
	if err != nil {
		return fmt.Errorf("prepare insert: %w", err)
	}
	defer b.Abort()
	at := s.now().UTC().Truncate(time.Second)
	for _, r := range records {
		e := r.Event
		keys, values := e.DimensionArrays()
		if err := b.Append(e.ID, uint8(e.Version), e.AccountID, string(e.Environment), e.KeyID,
			e.Type, e.Time.UTC(), uint64(e.Time.UnixMicro()), e.Route, e.Method, uint16(e.Status),
			uint64(e.LatencyMicros), uint64(e.RequestBytes), uint64(e.ResponseBytes),
			e.Units, e.RequestID, e.ClientID, keys, values, int32(r.Partition), r.Offset, at); err != nil {
			return fmt.Errorf("append event %s: %w", e.ID, err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert raw events: %w", err)
	}
	return nil
}

const insertLateSQL = `INSERT INTO late_events (event_id, account_id, environment, key_id, event_type,
 timestamp, timestamp_us, units, record_time, kafka_partition, kafka_offset, payload, ingested_at)`

// InsertLate writes events that came after the allowed lateness, whole.
func (s *Sink) InsertLate(ctx context.Context, records []ingest.Record) error {
	b, err := s.conn.PrepareBatch(ctx, insertLateSQL)
	if err != nil {
		return fmt.Errorf("prepare late insert: %w", err)
	}
	defer b.Abort()
	at := s.now().UTC().Truncate(time.Second)
	for _, r := range records {
		e := r.Event
		if err := b.Append(e.ID, e.AccountID, string(e.Environment), e.KeyID, e.Type, e.Time.UTC(),
			uint64(e.Time.UnixMicro()), e.Units, r.RecordTime.UTC(), int32(r.Partition), r.Offset,
			string(r.Value), at); err != nil {
			return fmt.Errorf("append late event %s: %w", e.ID, err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert late events: %w", err)
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
