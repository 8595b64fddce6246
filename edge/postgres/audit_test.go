package postgres_test

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
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
	t.Run("one IPv6 site cycling its source addresses cannot crowd out another's failures", func(t *testing.T) {
		// Each failure from another address of one /48 (a host has a
		// whole /64 to pick from), each with a made-up prefix.
		for i := range edgepg.MaxDistinct {
			w.Record(failure(fmt.Sprintf("2001:db8:1:%x::%x", i%7, i+1), fmt.Sprintf("sk_live_v6%04d", i)))
		}
		w.Record(failure("198.51.100.3", "sk_live_Real"))
		w.Flush(ctx)
		if rows, total := count(t, "remote_addr = $1 AND key_prefix = $2", "198.51.100.3", "sk_live_Real"); rows != 1 || total != 1 {
			t.Errorf("the other address's failure: %d rows for %d failures, want its own row", rows, total)
		}
		rows, total := count(t, "remote_addr LIKE '2001:db8:1:%'")
		if total != edgepg.MaxDistinct || rows > edgepg.MaxPerRemote+1 {
			t.Errorf("the flooding site: %d rows for %d failures, want all %d in at most %d rows",
				rows, total, edgepg.MaxDistinct, edgepg.MaxPerRemote+1)
		}
		if folded, _ := count(t, "remote_addr = $1", "2001:db8:1::/48"); folded != 1 {
			t.Errorf("%d rows folded under the site's /48, want 1", folded)
		}
	})
	t.Run("failures against real keys keep rows past a flood of made-up ones from many networks", func(t *testing.T) {
		for i := range edgepg.MaxDistinct {
			w.Record(failure(fmt.Sprintf("10.%d.%d.1", i/250, i%250), fmt.Sprintf("sk_live_m%04d", i)))
		}
		real := failure("192.0.2.44", "sk_live_Leak")
		real.Reason, real.AccountID, real.KeyID = "revoked", "acct_leaked", "key_leaked"
		w.Record(real)
		w.Flush(ctx)
		if rows, total := count(t, "key_id = $1 AND remote_addr = $2", "key_leaked", "192.0.2.44"); rows != 1 || total != 1 {
			t.Errorf("the revoked key's failure: %d rows for %d failures, want its own row", rows, total)
		}
		if rows, _ := count(t, "remote_addr LIKE '10.%'"); rows != edgepg.MaxDistinct-edgepg.KeyedReserve {
			t.Errorf("the made-up keys took %d rows, want %d, the rest folded into overflow", rows, edgepg.MaxDistinct-edgepg.KeyedReserve)
		}
	})
	t.Run("a real key's failure keeps its account past its network's made-up ones", func(t *testing.T) {
		// 20 made-up keys first, then a revoked key, from one address; and
		// two IPv4 clients behind one NAT64 gateway, each its own.
		for i := range edgepg.MaxPerRemote {
			w.Record(failure("203.0.113.9", fmt.Sprintf("sk_live_f%04d", i)))
		}
		real := failure("203.0.113.9", "sk_live_Leak2")
		real.Reason, real.AccountID, real.KeyID = "revoked", "acct_victim", "key_leaked2"
		w.Record(real)
		for i := range edgepg.MaxPerRemote {
			w.Record(failure("64:ff9b::c633:6401", fmt.Sprintf("sk_live_n%04d", i)))
		}
		w.Record(failure("64:ff9b::cb00:7101", "sk_live_Other"))
		w.Flush(ctx)
		if rows, _ := count(t, "key_id = $1 AND account_id = $2 AND remote_addr = $3", "key_leaked2", "acct_victim", "203.0.113.9"); rows != 1 {
			t.Errorf("the revoked key's failure after 20 made-up ones: %d rows naming its account and key, want 1", rows)
		}
		if rows, _ := count(t, "remote_addr = $1 AND key_prefix = $2", "64:ff9b::cb00:7101", "sk_live_Other"); rows != 1 {
			t.Errorf("another NAT64 client's failure: %d rows of its own, want 1 (it is not the first client's network)", rows)
		}
	})
	t.Run("one real key tried from ever new addresses cannot take every row", func(t *testing.T) {
		for i := range 2 * edgepg.MaxDistinct {
			ev := failure(fmt.Sprintf("2001:db8:9:1::%x", i+1), "sk_live_Gone")
			ev.Reason, ev.AccountID, ev.KeyID = "revoked", "acct_spray", "key_spray"
			w.Record(ev)
		}
		victim := failure("198.51.100.44", "sk_live_Vict")
		victim.Reason, victim.AccountID, victim.KeyID = "revoked", "acct_victim2", "key_victim2"
		w.Record(victim)
		w.Record(failure("192.0.2.77", "sk_live_Other2"))
		w.Flush(ctx)
		rows, total := count(t, "key_id = $1", "key_spray")
		if total != 2*edgepg.MaxDistinct || rows > edgepg.MaxPerRemote+1 {
			t.Errorf("the sprayed key: %d rows for %d failures, want all %d in at most %d rows", rows, total, 2*edgepg.MaxDistinct, edgepg.MaxPerRemote+1)
		}
		if folded, _ := count(t, "key_id = $1 AND account_id = $2 AND remote_addr = ''", "key_spray", "acct_spray"); folded != 1 {
			t.Errorf("%d folded rows keep the sprayed key's account and key, without an address, want 1", folded)
		}
		if rows, _ := count(t, "key_id = $1", "key_victim2"); rows != 1 {
			t.Errorf("another account's revoked key: %d rows, want its own", rows)
		}
		if rows, _ := count(t, "key_prefix = $1", "sk_live_Other2"); rows != 1 {
			t.Errorf("another address's made-up key: %d rows, want its own", rows)
		}
	})
	t.Run("one real key tried from many networks cannot fold another key's failures out", func(t *testing.T) {
		for i := range edgepg.MaxDistinct {
			ev := failure(fmt.Sprintf("10.%d.%d.9", i/250, i%250), "sk_live_Bot1")
			ev.Reason, ev.AccountID, ev.KeyID = "revoked", "acct_botnet", "key_botnet"
			w.Record(ev)
		}
		victim := failure("198.51.100.45", "sk_live_Vic3")
		victim.Reason, victim.AccountID, victim.KeyID = "revoked", "acct_victim3", "key_victim3"
		w.Record(victim)
		w.Flush(ctx)
		rows, total := count(t, "key_id = $1", "key_botnet")
		if total != edgepg.MaxDistinct || rows > edgepg.MaxPerRemote+1 {
			t.Errorf("the key tried from %d networks: %d rows for %d failures, want all in at most %d rows",
				edgepg.MaxDistinct, rows, total, edgepg.MaxPerRemote+1)
		}
		if rows, _ := count(t, "key_id = $1 AND account_id = $2", "key_victim3", "acct_victim3"); rows != 1 {
			t.Errorf("another account's revoked key: %d rows, want its own", rows)
		}
	})
	t.Run("many real keys tried from the same addresses each cost at most 21 rows", func(t *testing.T) {
		// 25 keys, each tried from the same 40 addresses (40 networks):
		// once 20 keys have rows at an address, its network's bound for
		// real keys is full, and a later key must not get a folded row
		// there for every such network. Each key keeps its account and
		// key, in at most 21 rows.
		const keys, addrs = 25, 40
		for k := range keys {
			for a := range addrs {
				ev := failure(fmt.Sprintf("198.18.1.%d", 1+a), "sk_live_Many")
				ev.Reason, ev.AccountID, ev.KeyID = "revoked", "acct_many", fmt.Sprintf("key_many_%02d", k)
				w.Record(ev)
			}
		}
		w.Flush(ctx)
		for k := range keys {
			rows, total := count(t, "key_id = $1 AND account_id = 'acct_many'", fmt.Sprintf("key_many_%02d", k))
			if total != addrs || rows > edgepg.MaxPerRemote+1 {
				t.Errorf("key %d: %d rows for %d failures, want all %d in at most %d rows", k, rows, total, addrs, edgepg.MaxPerRemote+1)
			}
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

// Failed authentications still pending when the process stops are written
// by Close even when the database is down as it starts: Close keeps trying
// until it is back (within 10 s), and says how many rows it lost when it
// is not. Before, one failed try lost them.
func TestCloseWritesPendingAuditRowsOnceTheDatabaseIsBack(t *testing.T) {
	inst := testenv.PrivatePostgres(t)
	ctx := context.Background()
	db, err := sql.Open("pgx", inst.Addr)
	testenv.Must(t, err, "open the private database")
	_, err = schemas.MigratePostgres(ctx, db)
	testenv.Must(t, err, "migrate the private database")
	_ = db.Close()
	pool, err := pgxpool.New(ctx, inst.Addr)
	testenv.Must(t, err, "pool")
	defer pool.Close()
	count := func(t *testing.T, remote string) (rows, total int) {
		t.Helper()
		testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*), coalesce(sum((details->>'count')::int), 0) FROM audit_log WHERE remote_addr = $1`, remote).
			Scan(&rows, &total), "count audit rows")
		return rows, total
	}
	reg := prometheus.NewRegistry()
	w, err := edgepg.NewAuditWriter(pool, time.Hour, reg, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new audit writer")
	for range 7 {
		w.Record(failure("192.0.2.44", "sk_live_Late"))
	}
	inst.Stop()
	closed := make(chan error, 1)
	go func() { closed <- w.Close() }()
	// Close's first tries fail while the database is down.
	for deadline := time.Now().Add(5 * time.Second); failedWrites(t, reg) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no failed write while the database was down")
		}
	}
	inst.Start()
	select {
	case err := <-closed:
		testenv.Must(t, err, "close")
	case <-time.After(20 * time.Second):
		t.Fatal("Close still running 20 s on")
	}
	if rows, total := count(t, "192.0.2.44"); rows != 1 || total != 7 {
		t.Fatalf("after Close: %d rows for %d failures; want 1 row for 7", rows, total)
	}

	// A database that does not come back: Close gives up and says so.
	w, err = edgepg.NewAuditWriter(pool, time.Hour, nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new audit writer")
	edgepg.SetFinalWait(w, time.Second)
	w.Record(failure("192.0.2.45", "sk_live_Lost"))
	inst.Stop()
	if err := w.Close(); err == nil || !strings.Contains(err.Error(), "1 audit rows not written") {
		t.Fatalf("Close with the database down: %v; want 1 audit rows not written", err)
	}
}

// failedWrites is the writer's tollgate_edge_audit_write_errors_total in reg.
func failedWrites(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() == "tollgate_edge_audit_write_errors_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("no tollgate_edge_audit_write_errors_total")
	return 0
}

// A database gone silent (no close, no reset: a failover, a dead host)
// under a periodic flush does not hold up Close past its final wait.
// Before, the flush waited until TCP gave up, minutes later, and the edge's
// stop, which closed the audit writer first, never reached its usage
// events.
func TestCloseIsNotHeldByAFlushToASilentDatabase(t *testing.T) {
	f, silent := testenv.NewPostgres(t).Freezable(t)
	pool, err := pgxpool.New(context.Background(), silent)
	testenv.Must(t, err, "pool")
	t.Cleanup(pool.Close)
	testenv.Must(t, pool.Ping(context.Background()), "ping through the freezer")
	w, err := edgepg.NewAuditWriter(pool, 100*time.Millisecond, nil, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "new audit writer")
	edgepg.SetFinalWait(w, time.Second)
	f.Freeze()
	w.Record(failure("192.0.2.46", "sk_live_Slnt"))
	time.Sleep(500 * time.Millisecond) // a periodic flush is now waiting on the database
	closed := make(chan error, 1)
	go func() { closed <- w.Close() }()
	select {
	case err := <-closed:
		if err == nil || !strings.Contains(err.Error(), "1 audit rows not written") {
			t.Fatalf("Close with the database silent: %v; want 1 audit rows not written", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Close still waiting 15 s on (its final wait is 1 s)")
	}
}
