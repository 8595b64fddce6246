package aggregator

import (
	"context"
	"time"
)

// SpoolHold is an edge instance's claim on usage time (Postgres table
// edge_spool_holds): events from Since on wait in its spool, or were drained
// to Kafka by Released but may not have landed yet.
type SpoolHold struct {
	Instance string
	Since    time.Time
	// Released is zero while the spool holds events.
	Released time.Time
}

// SpoolHolds reads the edges' spool holds. The usage API only reads them:
// retiring a released hold is the invoicer's work.
type SpoolHolds interface {
	SpoolHolds(ctx context.Context) ([]SpoolHold, error)
}

// heldThrough is the landed watermark capped by the edges' spool holds, as
// the invoicer's gate (invoicer.HeldWatermark) caps it before it closes a
// period. Events an edge spooled while Kafka was unreachable reach Kafka
// later, with record times the watermark has already passed, so the
// watermark alone would call usage complete before they land. A hold not
// yet released caps the watermark at its Since; a released one caps it
// until the watermark passes Released, when every drained event has landed.
func heldThrough(watermark time.Time, holds []SpoolHold) time.Time {
	held := watermark
	for _, h := range holds {
		if !h.Released.IsZero() && !watermark.Before(h.Released) {
			continue
		}
		if h.Since.Before(held) {
			held = h.Since
		}
	}
	return held
}
