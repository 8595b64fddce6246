package postgres

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/edge"
)

// HoldWriter keeps this edge instance's row in edge_spool_holds in step
// with its producer's spool (edge.SpoolHold), so the invoicer closes no
// period whose events still wait in the spool.
type HoldWriter struct {
	pool     *pgxpool.Pool
	instance string
	hold     func() edge.SpoolHold
	log      *slog.Logger
	// written is the hold last stored; synced is set once the row has
	// been brought in line at start.
	written edge.SpoolHold
	synced  bool
	// failing is set while writes fail, so a long outage logs once.
	failing bool
	// stored, when set, is told each hold once it is stored.
	stored func(edge.SpoolHold)
}

// OnStored has the writer call f with each hold once it is stored.
func (w *HoldWriter) OnStored(f func(edge.SpoolHold)) { w.stored = f }

// NewHoldWriter returns a writer for instance (stable across restarts of
// the same edge and spool directory), reading the hold from hold.
func NewHoldWriter(pool *pgxpool.Pool, instance string, hold func() edge.SpoolHold, log *slog.Logger) *HoldWriter {
	return &HoldWriter{pool: pool, instance: instance, hold: hold, log: log}
}

// Run syncs the row every interval until ctx ends, then once more with a
// short deadline of its own (a graceful stop's last drain released the hold).
func (w *HoldWriter) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		w.Sync(ctx)
		select {
		case <-ctx.Done():
			last, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			w.Sync(last)
			return
		case <-t.C:
		}
	}
}

// Sync stores the producer's hold if it changed since the last Sync.
//
// The first Sync after a start releases, as of now, a hold the previous run
// left unreleased if the spool is empty now (it drained, but that run
// stopped before it said so); if the spool is not empty, the stored hold's
// since is kept when it is earlier.
func (w *HoldWriter) Sync(ctx context.Context) {
	h := w.hold()
	if w.synced && h == w.written {
		return
	}
	var err error
	switch {
	case !h.Since.IsZero() && h.Released.IsZero():
		// A released hold the invoicer has not retired yet is merged:
		// its drained events may not have landed.
		_, err = w.pool.Exec(ctx, `INSERT INTO edge_spool_holds (instance, since) VALUES ($1, $2)
			ON CONFLICT (instance) DO UPDATE SET since = least(edge_spool_holds.since, excluded.since),
				released_at = NULL, updated_at = now()`, w.instance, h.Since)
	case !h.Since.IsZero():
		_, err = w.pool.Exec(ctx, `INSERT INTO edge_spool_holds (instance, since, released_at) VALUES ($1, $2, $3)
			ON CONFLICT (instance) DO UPDATE SET since = least(edge_spool_holds.since, excluded.since),
				released_at = greatest(edge_spool_holds.released_at, excluded.released_at), updated_at = now()`,
			w.instance, h.Since, h.Released)
	case !w.synced:
		_, err = w.pool.Exec(ctx, `UPDATE edge_spool_holds SET released_at = now(), updated_at = now()
			WHERE instance = $1 AND released_at IS NULL`, w.instance)
	}
	if err != nil {
		if !w.failing {
			w.log.Error("could not store the spool's hold on usage; retrying", "instance", w.instance, "err", err)
			w.failing = true
		}
		return
	}
	if w.failing {
		w.log.Info("spool hold stored again", "instance", w.instance)
		w.failing = false
	}
	w.written, w.synced = h, true
	if w.stored != nil {
		w.stored(h)
	}
}

// Instance names an edge's spool hold by its spool's id (kafka.Spool.ID):
// one edge process holds a spool at a time, and whatever host it runs on,
// an edge on that spool finds its hold.
func Instance(spoolID string) string { return "spool-" + spoolID }
