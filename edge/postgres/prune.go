package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// MinFailedAuthRetention is the youngest a failed authentication's row
// may be pruned at: the last day's are what an operator looks into.
const MinFailedAuthRetention = 24 * time.Hour

// pruneBatch is how many rows one transaction of a prune deletes, so a
// prune of millions of rows holds no long lock and leaves no huge
// transaction behind.
const pruneBatch = 50_000

// PruneFailedAuth deletes the audit rows of failed authentications
// (auth.failed, admin.auth_failed) recorded before before, in batches.
// Each batch records itself in the audit log in its own transaction
// (audit.pruned, with how many rows it deleted and the cutoff), so a prune
// cut off halfway leaves no deletion unrecorded. Key events are never
// deleted: the table's trigger refuses them, rows less than a day old, and
// any delete of a transaction that has not set tollgate.prune_failed_auth.
func PruneFailedAuth(ctx context.Context, pool *pgxpool.Pool, before time.Time, actor string) (int64, error) {
	if time.Since(before) < MinFailedAuthRetention {
		return 0, fmt.Errorf("prune failed authentications: %s is less than %s ago", before.UTC().Format(time.RFC3339), MinFailedAuthRetention)
	}
	var total int64
	for {
		var n int64
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var err error
			n, err = pruneOnce(ctx, tx, before, actor)
			return err
		})
		if err != nil {
			return total, fmt.Errorf("prune failed authentications (%d deleted before this): %w", total, err)
		}
		total += n
		if n < pruneBatch {
			return total, nil
		}
	}
}

// pruneOnce deletes up to pruneBatch of the rows in tx, and records that
// it did. Rows another prune holds are passed over, not waited for.
func pruneOnce(ctx context.Context, tx pgx.Tx, before time.Time, actor string) (int64, error) {
	if _, err := tx.Exec(ctx, `SET LOCAL tollgate.prune_failed_auth = 'on'`); err != nil {
		return 0, err
	}
	tag, err := tx.Exec(ctx, `DELETE FROM audit_log WHERE id IN (
    SELECT id FROM audit_log WHERE action IN ('auth.failed', 'admin.auth_failed') AND at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED)`, before, pruneBatch)
	if err != nil {
		return 0, err
	}
	n := tag.RowsAffected()
	details, err := json.Marshal(map[string]any{"deleted": n, "before": before.UTC().Format(time.RFC3339Nano)})
	if err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO audit_log (actor, action, details) VALUES ($1, 'audit.pruned', $2)`, actor, details); err != nil {
		return 0, fmt.Errorf("record the prune of %d failed authentications: %w", n, err)
	}
	return n, nil
}
