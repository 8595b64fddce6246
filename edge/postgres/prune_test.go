package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"

	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// Failed authentications' rows older than the cutoff can be pruned, and
// only by the prune: key events stay, every other DELETE and UPDATE is
// still refused, and the prune is in the log itself. Before, audit_log
// refused every DELETE, and a network making up keys grew it for good.
func TestPruneDeletesOnlyOldFailedAuthentications(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	now := time.Now()
	for _, r := range []struct {
		action string
		age    time.Duration
	}{
		{"auth.failed", 48 * time.Hour}, {"auth.failed", 72 * time.Hour}, {"admin.auth_failed", 48 * time.Hour},
		{"auth.failed", time.Hour}, {"key.created", 48 * time.Hour}, {"key.revoked", 72 * time.Hour},
	} {
		_, err := pg.Pool.Exec(ctx, `INSERT INTO audit_log (at, actor, action) VALUES ($1, 'test', $2)`, now.Add(-r.age), r.action)
		testenv.Must(t, err, "insert audit row")
	}
	for _, stmt := range []string{
		`DELETE FROM audit_log WHERE action = 'auth.failed'`,
		`UPDATE audit_log SET reason = 'x' WHERE action = 'auth.failed'`,
		`TRUNCATE audit_log`,
		// The setting guards against mistakes: set for a whole session,
		// it still lets no row of the last day go.
		`SET tollgate.prune_failed_auth = 'on'; DELETE FROM audit_log WHERE action = 'auth.failed' AND at > now() - interval '2 hours'`,
	} {
		if _, err := pg.Pool.Exec(ctx, stmt); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s outside a prune: %v, want refused as append-only", stmt, err)
		}
	}
	if _, err := edgepg.PruneFailedAuth(ctx, pg.Pool, now.Add(-time.Hour), "test"); err == nil {
		t.Error("a prune of the last hour's failed authentications ran, want refused")
	}
	n, err := edgepg.PruneFailedAuth(ctx, pg.Pool, now.Add(-25*time.Hour), "test")
	testenv.Must(t, err, "prune")
	if n != 3 {
		t.Errorf("%d rows pruned, want the 3 failed authentications older than a day", n)
	}
	rows, err := pg.Pool.Query(ctx, `SELECT action FROM audit_log ORDER BY id`)
	testenv.Must(t, err, "list audit rows")
	var left []string
	for rows.Next() {
		var a string
		testenv.Must(t, rows.Scan(&a), "scan")
		left = append(left, a)
	}
	testenv.Must(t, rows.Err(), "list audit rows")
	if got, want := strings.Join(left, " "), "auth.failed key.created key.revoked audit.pruned"; got != want {
		t.Errorf("audit rows left: %s, want %s", got, want)
	}
	var deleted int64
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT (details->>'deleted')::bigint FROM audit_log WHERE action = 'audit.pruned'`).Scan(&deleted), "the prune's row")
	if deleted != 3 {
		t.Errorf("the prune's row says %d deleted, want 3", deleted)
	}
	// A key event stays even inside a prune's transaction.
	tx, err := pg.Pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = tx.Exec(ctx, `SET LOCAL tollgate.prune_failed_auth = 'on'`)
	testenv.Must(t, err, "set")
	if _, err := tx.Exec(ctx, `DELETE FROM audit_log WHERE action = 'key.created'`); err == nil {
		t.Error("a key event was deleted in a prune's transaction")
	}
}

// A prune's deletions and its record of them commit together: a prune cut
// off halfway leaves no deleted row unrecorded. Before, every batch
// committed first and the one record came after the last.
func TestAPruneThatCannotRecordItselfDeletesNothing(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	for range 3 {
		_, err := pg.Pool.Exec(ctx, `INSERT INTO audit_log (at, actor, action) VALUES (now() - interval '3 days', 'test', 'auth.failed')`)
		testenv.Must(t, err, "insert audit row")
	}
	_, err := pg.Pool.Exec(ctx, `CREATE FUNCTION refuse_prune_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.action = 'audit.pruned' THEN RAISE EXCEPTION 'no room for the record'; END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER refuse_prune_record BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION refuse_prune_record()`)
	testenv.Must(t, err, "make the prune's record fail")
	if _, err := edgepg.PruneFailedAuth(ctx, pg.Pool, time.Now().Add(-25*time.Hour), "test"); err == nil {
		t.Fatal("a prune that could not record itself succeeded")
	}
	var left int
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT count(*) FROM audit_log WHERE action = 'auth.failed'`).Scan(&left), "count")
	if left != 3 {
		t.Errorf("%d of 3 failed authentications left after a prune that could not record itself, want all 3", left)
	}
}
