package invoicer

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// SpoolHolds are the edge instances' holds as the invoicer reads them.
type SpoolHolds interface {
	SpoolHolds(ctx context.Context) ([]schemas.SpoolHold, error)
	// RetireSpoolHold removes instance's hold if it is still the released
	// one given; a hold the edge has taken up again since is kept.
	RetireSpoolHold(ctx context.Context, h schemas.SpoolHold) error
}

// HeldWatermark is the usage watermark held back by the edges' spools: a
// period is complete only when every event of it is in Kafka and landed.
// Events an edge spooled while Kafka was unreachable reach Kafka later,
// with later record times than the usage watermark goes by, so without the
// holds a period could close before they land, and they would never be
// billed.
//
// A hold not yet released caps the watermark at its Since. A released hold
// caps it until the usage watermark passes Released (every drained event
// has landed), and is then retired.
type HeldWatermark struct {
	Usage Watermark
	Holds SpoolHolds
	Log   *slog.Logger
}

var _ Watermark = HeldWatermark{}

// Watermark implements Watermark. Holds that cannot be read are an error:
// closing without them could bill a period short.
func (h HeldWatermark) Watermark(ctx context.Context) (time.Time, error) {
	wm, err := h.Usage.Watermark(ctx)
	if err != nil {
		return wm, err
	}
	holds, err := h.Holds.SpoolHolds(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("read the edges' spool holds: %w", err)
	}
	held := wm
	for _, s := range holds {
		if s.Passed(wm) {
			if err := h.Holds.RetireSpoolHold(ctx, s); err != nil {
				h.Log.Warn("could not retire a released spool hold; retried on the next run", "instance", s.Instance, "err", err)
			}
			continue
		}
		if s.Since.Before(held) {
			h.Log.Warn("an edge's spooled events hold usage back; periods after this time wait for them",
				"instance", s.Instance, "since", s.Since, "drained", !s.Released.IsZero(), "usage_watermark", wm)
			held = s.Since
		}
	}
	return held, nil
}
