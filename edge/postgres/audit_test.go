package postgres_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

func failure(remote, prefix string) edge.AuditEvent {
	return edge.AuditEvent{At: time.Now(), Actor: "api", Action: edge.ActionAuthFailed, KeyPrefix: prefix,
		RemoteAddr: remote, Reason: "unknown"}
}

func TestAuditWriter(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	count := func(t *testing.T, where string, args ...any) (rows, total int) {
		t.Helper()
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT count(*), coalesce(sum((details->>'count')::int), 0) FROM audit_log WHERE `+where, args...).
			Scan(&rows, &total), "count audit rows")
		return rows, total
	}
	w, err := edgepg.NewAuditWriter(pg.Pool, time.Hour, nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new audit writer")
	defer w.Close()

	t.Run("one address making up key prefixes cannot crowd out another's failures", func(t *testing.T) {
		for i := range 3 * edgepg.MaxDistinct {
			w.Record(failure("203.0.113.7", fmt.Sprintf("sk_live_%04d", i)))
		}
		w.Record(failure("198.51.100.2", "sk_live_Real"))
		w.Flush(ctx)
		if rows, total := count(t, "remote_addr = $1 AND key_prefix = $2", "198.51.100.2", "sk_live_Real"); rows != 1 || total != 1 {
			t.Errorf("the other address's failure: %d rows for %d failures, want its own row", rows, total)
		}
		rows, total := count(t, "remote_addr = $1", "203.0.113.7")
		if total != 3*edgepg.MaxDistinct || rows > edgepg.MaxPerRemote+1 {
			t.Errorf("the flooding address: %d rows for %d failures, want all %d in at most %d rows",
				rows, total, 3*edgepg.MaxDistinct, edgepg.MaxPerRemote+1)
		}
	})
	t.Run("rows a failed write could not store are written by the next flush", func(t *testing.T) {
		for range 5 {
			w.Record(failure("192.0.2.9", "sk_live_Gone"))
		}
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		w.Flush(cancelled)
		if rows, _ := count(t, "remote_addr = $1", "192.0.2.9"); rows != 0 {
			t.Fatalf("%d rows written by a flush whose context was cancelled", rows)
		}
		w.Flush(ctx)
		if rows, total := count(t, "remote_addr = $1", "192.0.2.9"); rows != 1 || total != 5 {
			t.Errorf("after the next flush: %d rows for %d failures, want 1 row for 5", rows, total)
		}
	})
}
