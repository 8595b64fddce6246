package postgres_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// The stored hold follows the producer's through a spool's episodes and an
// edge's restarts, never moving later than a hold whose events may not
// have landed.
func TestHoldWriterKeepsTheSpoolsHold(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	const instance = "host:/spool"
	stored := func() (since, released *time.Time) {
		t.Helper()
		err := pg.Pool.QueryRow(ctx, `SELECT since, released_at FROM edge_spool_holds WHERE instance = $1`, instance).Scan(&since, &released)
		if err != nil {
			return nil, nil
		}
		return since, released
	}
	t0 := time.Date(2026, 3, 31, 23, 0, 0, 0, time.UTC)
	var hold edge.SpoolHold
	start := func() *edgepg.HoldWriter {
		return edgepg.NewHoldWriter(pg.Pool, instance, func() edge.SpoolHold { return hold }, log)
	}

	w := start()
	w.Sync(ctx)
	if s, _ := stored(); s != nil {
		t.Fatalf("an empty spool stored a hold since %s", s)
	}
	hold = edge.SpoolHold{Since: t0}
	w.Sync(ctx)
	if s, r := stored(); s == nil || !s.Equal(t0) || r != nil {
		t.Fatalf("spooling: stored %v, %v; want an active hold since %s", s, r, t0)
	}
	hold.Released = t0.Add(time.Hour)
	w.Sync(ctx)
	if s, r := stored(); s == nil || !s.Equal(t0) || r == nil || !r.Equal(t0.Add(time.Hour)) {
		t.Fatalf("drained: stored %v, %v; want released at %s", s, r, t0.Add(time.Hour))
	}
	// Spooling again before the invoicer retired the released hold: its
	// events may not have landed, so the new hold keeps the old since.
	hold = edge.SpoolHold{Since: t0.Add(2 * time.Hour)}
	w.Sync(ctx)
	if s, r := stored(); s == nil || !s.Equal(t0) || r != nil {
		t.Fatalf("spooling again: stored %v, %v; want an active hold still since %s", s, r, t0)
	}
	// A restart with events still in the spool (its first one stands for
	// the oldest) keeps the stored, earlier since.
	hold = edge.SpoolHold{Since: t0.Add(3 * time.Hour)}
	start().Sync(ctx)
	if s, r := stored(); s == nil || !s.Equal(t0) || r != nil {
		t.Fatalf("restarted while spooling: stored %v, %v; want since %s kept", s, r, t0)
	}
	// A restart with the spool empty: the run before drained it but
	// stopped before saying so. The hold is released as of now.
	hold = edge.SpoolHold{}
	before := time.Now().Add(-time.Second)
	start().Sync(ctx)
	if s, r := stored(); s == nil || !s.Equal(t0) || r == nil || r.Before(before) {
		t.Fatalf("restarted with an empty spool: stored %v, %v; want released now", s, r)
	}
}
