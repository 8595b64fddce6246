// Package clickhouse writes usage events to the raw events table.
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

var _ ingest.Sink = (*Sink)(nil)

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
