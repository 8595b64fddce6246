package schemas

import "time"

// SpoolHold is an edge instance's claim on usage time (Postgres table
// edge_spool_holds): events from Since on wait in its spool, or were drained
// to Kafka by Released but may not have landed yet. The edge writes it; the
// invoicer's gate and the usage API's complete_through read it.
type SpoolHold struct {
	Instance string
	Since    time.Time
	// Released is zero while the spool holds events.
	Released time.Time
}

// Passed reports whether the hold no longer holds usage back at watermark:
// it was released, and the landed watermark has reached its release, so
// every event it drained has landed.
func (h SpoolHold) Passed(watermark time.Time) bool {
	return !h.Released.IsZero() && !watermark.Before(h.Released)
}

// HeldThrough is the landed watermark capped by the edges' spool holds.
// Events an edge spooled while Kafka was unreachable reach Kafka later,
// with record times the watermark has already passed, so the watermark
// alone would call usage complete before they land. A hold not yet passed
// caps the watermark at its Since.
func HeldThrough(watermark time.Time, holds []SpoolHold) time.Time {
	held := watermark
	for _, h := range holds {
		if !h.Passed(watermark) && h.Since.Before(held) {
			held = h.Since
		}
	}
	return held
}
