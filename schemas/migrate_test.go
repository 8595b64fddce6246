package schemas_test

import (
	"context"
	"database/sql"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

func migrationVersions(t *testing.T) []string {
	t.Helper()
	m, err := schemas.PostgresMigrations()
	testenv.Must(t, err, "migrations")
	entries, err := fs.ReadDir(m, ".")
	testenv.Must(t, err, "read migrations")
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func TestPostgresMigrationsApplyForwardFromEveryVersion(t *testing.T) {
	names := migrationVersions(t)
	if len(names) == 0 {
		t.Fatal("no migrations embedded")
	}
	for i := range names {
		stop := names[i]
		t.Run("from "+stop, func(t *testing.T) {
			t.Parallel()
			pg := testenv.NewEmptyPostgres(t)
			db, err := sql.Open("pgx", pg.URL)
			testenv.Must(t, err, "open")
			defer db.Close()
			ctx := context.Background()
			var v int64
			if _, err := fmt.Sscanf(stop, "%d", &v); err != nil {
				t.Fatalf("migration %s has no numeric version: %v", stop, err)
			}
			got, err := schemas.MigratePostgresTo(ctx, db, v)
			testenv.Must(t, err, "migrate to "+stop)
			if got != v {
				t.Fatalf("at version %d, want %d", got, v)
			}
			// Data written at the old version must survive the rest.
			if _, err := db.ExecContext(ctx, `INSERT INTO accounts (id, name) VALUES ('acct_old', 'Old')`); err != nil {
				t.Fatalf("write at version %d: %v", v, err)
			}
			latest, err := schemas.MigratePostgres(ctx, db)
			testenv.Must(t, err, "migrate forward")
			var name string
			testenv.Must(t, db.QueryRowContext(ctx, `SELECT name FROM accounts WHERE id = 'acct_old'`).Scan(&name), "read back")
			if name != "Old" {
				t.Fatalf("account name %q after migrating to %d", name, latest)
			}
			// Applying again is a no-op.
			again, err := schemas.MigratePostgres(ctx, db)
			testenv.Must(t, err, "migrate again")
			if again != latest {
				t.Fatalf("second run moved version %d -> %d", latest, again)
			}
		})
	}
}

func TestLedgerAndAuditLogAreAppendOnly(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	_, err := pg.Pool.Exec(ctx, `INSERT INTO accounts (id, name) VALUES ('acct_1', 'A')`)
	testenv.Must(t, err, "account")
	_, err = pg.Pool.Exec(ctx, `INSERT INTO ledger_entries (account_id, kind, amount_minor, currency) VALUES ('acct_1', 'invoice', 100, 'usd')`)
	testenv.Must(t, err, "ledger entry")
	_, err = pg.Pool.Exec(ctx, `INSERT INTO audit_log (actor, action) VALUES ('test', 'key.created')`)
	testenv.Must(t, err, "audit entry")
	for _, stmt := range []string{
		`UPDATE ledger_entries SET amount_minor = 1`,
		`DELETE FROM ledger_entries`,
		`UPDATE audit_log SET action = 'x'`,
		`DELETE FROM audit_log`,
	} {
		t.Run(strings.Fields(stmt)[0]+" "+strings.Fields(stmt)[1]+" is refused", func(t *testing.T) {
			_, err := pg.Pool.Exec(ctx, stmt)
			if err == nil || !strings.Contains(err.Error(), "append-only") {
				t.Fatalf("%s: got %v, want an append-only error", stmt, err)
			}
		})
	}
}

// TestClickHouseRawEventsDDLIsPinned pins the raw events table: a change to
// its columns, sorting key or engine is a contract change and must show up
// here.
func TestClickHouseRawEventsDDLIsPinned(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	// system.columns lists a table's columns in table order (18.16 has no
	// position column to sort by).
	rows, err := ch.Conn.Query(ctx, `SELECT name, type FROM system.columns
		WHERE database = currentDatabase() AND table = 'usage_events'`)
	testenv.Must(t, err, "read columns")
	var got []string
	for rows.Next() {
		var name, typ string
		testenv.Must(t, rows.Scan(&name, &typ), "scan")
		got = append(got, name+" "+typ)
	}
	rows.Close()
	want := []string{
		"event_id UUID", "schema_version UInt8", "account_id String",
		"environment Enum8('live' = 1, 'test' = 2)", "key_id String", "event_type String",
		"timestamp DateTime('UTC')", "timestamp_us UInt64", "route String", "method String",
		"status UInt16", "latency_us UInt64", "request_bytes UInt64", "response_bytes UInt64",
		"units Int64", "request_id String", "client_id String", "dim_keys Array(String)",
		"dim_values Array(String)", "kafka_partition Int32", "kafka_offset Int64", "ingested_at DateTime('UTC')",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("usage_events columns changed:\ngot:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	var engine, sortingKey string
	testenv.Must(t, ch.Conn.QueryRow(ctx, `SELECT engine, sorting_key FROM system.tables
		WHERE database = currentDatabase() AND name = 'usage_events'`).Scan(&engine, &sortingKey), "read table")
	if engine != "ReplacingMergeTree" {
		t.Fatalf("engine %s, want ReplacingMergeTree", engine)
	}
	if !strings.HasSuffix(strings.ReplaceAll(sortingKey, " ", ""), "timestamp,event_id") {
		t.Fatalf("sorting key %q must end with timestamp, event_id (deduplication relies on it)", sortingKey)
	}
	// Granules of 2,048 rows: the rollup recomputes read whole granules.
	var full string
	testenv.Must(t, ch.Conn.QueryRow(ctx, `SELECT engine_full FROM system.tables
		WHERE database = currentDatabase() AND name = 'usage_events'`).Scan(&full), "read engine")
	if !strings.Contains(full, "index_granularity = 2048") {
		t.Fatalf("engine %q: want index_granularity = 2048", full)
	}
	// Applying the DDL again changes nothing.
	testenv.Must(t, schemas.ApplyClickHouse(ctx, ch.Conn), "apply again")
}

// A COUNT meter stored through the admin API with a value, before
// meter.Validate refused one, loses the value: kept, it would fail
// validation and stop every meter from loading.
func TestStoredCountMetersLoseTheValueTheyNoLongerTake(t *testing.T) {
	pg := testenv.NewEmptyPostgres(t)
	db, err := sql.Open("pgx", pg.URL)
	testenv.Must(t, err, "open")
	defer db.Close()
	ctx := context.Background()
	_, err = schemas.MigratePostgresTo(ctx, db, 60)
	testenv.Must(t, err, "migrate to 60")
	_, err = db.ExecContext(ctx, `INSERT INTO meters (key, definition) VALUES
		('tokens', '{"key":"tokens","event_type":"api_call","aggregation":"COUNT","value":"dimensions.tokens"}'),
		('token_sum', '{"key":"token_sum","event_type":"api_call","aggregation":"SUM","value":"dimensions.tokens"}')`)
	testenv.Must(t, err, "store meters")
	_, err = schemas.MigratePostgres(ctx, db)
	testenv.Must(t, err, "migrate forward")
	for key, want := range map[string]string{
		"tokens":    `{"key": "tokens", "event_type": "api_call", "aggregation": "COUNT"}`,
		"token_sum": `{"key": "token_sum", "value": "dimensions.tokens", "event_type": "api_call", "aggregation": "SUM"}`,
	} {
		var got string
		testenv.Must(t, db.QueryRowContext(ctx, `SELECT definition::text FROM meters WHERE key = $1`, key).Scan(&got), "read "+key)
		if got != want {
			t.Errorf("meter %s stored as %s, want %s", key, got, want)
		}
	}
}

// Migrations that fill in what an existing database already did: 00110
// starts the Stripe sync at the epoch for a ledger that has synced
// invoices before (and records nothing for one that never has, so the
// first key's run starts it then); 00120 owes no rollup re-roll for an
// account whose zone was set before it.
func TestMigrationsBackfillWhatAnExistingDatabaseDid(t *testing.T) {
	ctx := context.Background()
	open := func(t *testing.T) *sql.DB {
		t.Helper()
		pg := testenv.NewEmptyPostgres(t)
		db, err := sql.Open("pgx", pg.URL)
		testenv.Must(t, err, "open")
		t.Cleanup(func() { _ = db.Close() })
		return db
	}
	exec := func(t *testing.T, db *sql.DB, q string) {
		t.Helper()
		_, err := db.ExecContext(ctx, q)
		testenv.Must(t, err, q)
	}

	t.Run("00110: a ledger that synced starts at the epoch", func(t *testing.T) {
		for _, synced := range []bool{true, false} {
			db := open(t)
			_, err := schemas.MigratePostgresTo(ctx, db, 100)
			testenv.Must(t, err, "migrate to 00100")
			exec(t, db, `INSERT INTO accounts (id, name) VALUES ('acct_old', 'Old')`)
			exec(t, db, `INSERT INTO ledger_entries (account_id, kind, currency) VALUES ('acct_old', 'invoice.finalized', 'usd')`)
			if synced {
				exec(t, db, `INSERT INTO ledger_entries (account_id, kind, currency) VALUES ('acct_old', 'invoice.synced', 'usd')`)
			}
			_, err = schemas.MigratePostgres(ctx, db)
			testenv.Must(t, err, "migrate forward")
			var n int
			var epoch bool
			var mode string
			testenv.Must(t, db.QueryRowContext(ctx, `SELECT count(*), coalesce(bool_and(started_at = 'epoch'), false), coalesce(max(mode), '')
				FROM stripe_sync_start`).Scan(&n, &epoch, &mode), "read stripe_sync_start")
			switch {
			case synced && (n != 1 || !epoch || mode != ""):
				t.Errorf("a ledger that synced: %d row(s), at the epoch %v, mode %q; want one row at the epoch with no mode yet", n, epoch, mode)
			case !synced && n != 0:
				t.Errorf("a ledger that never synced: %d row(s), want none (the first run with a key records its start)", n)
			}
		}
	})

	t.Run("00120: a zone set before it owes no re-roll, a change after it does", func(t *testing.T) {
		db := open(t)
		_, err := schemas.MigratePostgresTo(ctx, db, 110)
		testenv.Must(t, err, "migrate to 00110")
		exec(t, db, `INSERT INTO accounts (id, name, timezone) VALUES ('acct_tokyo', 'Tokyo', 'Asia/Tokyo')`)
		_, err = schemas.MigratePostgres(ctx, db)
		testenv.Must(t, err, "migrate forward")
		owed := func() bool {
			var ok bool
			testenv.Must(t, db.QueryRowContext(ctx, `SELECT timezone_changed_at IS NOT NULL AND timezone_changed_at IS DISTINCT FROM rollups_rezoned_for
				FROM accounts WHERE id = 'acct_tokyo'`).Scan(&ok), "read the account")
			return ok
		}
		if owed() {
			t.Fatal("an account whose zone was set before 00120 is owed a re-roll")
		}
		exec(t, db, `UPDATE accounts SET name = 'Tokyo KK' WHERE id = 'acct_tokyo'`)
		exec(t, db, `UPDATE accounts SET timezone = 'Asia/Tokyo' WHERE id = 'acct_tokyo'`)
		if owed() {
			t.Fatal("an update that leaves the zone as it was owes a re-roll")
		}
		exec(t, db, `UPDATE accounts SET timezone = 'Europe/Paris' WHERE id = 'acct_tokyo'`)
		if !owed() {
			t.Fatal("a zone change owes no re-roll")
		}
	})
}

// Processes that start together on one database (the components, or the
// replicas of one, after an upgrade that adds a migration) all start: they
// migrate one at a time. Before, the losers of the race failed on the
// winner's DDL (duplicate key in pg_type) and exited.
func TestProcessesStartingTogetherAllMigrate(t *testing.T) {
	latest := migrationVersions(t)
	var last int64
	if _, err := fmt.Sscanf(latest[len(latest)-1], "%d", &last); err != nil {
		t.Fatal(err)
	}
	for _, from := range []int64{0, 130} {
		t.Run(fmt.Sprintf("from version %d", from), func(t *testing.T) {
			for round := range 3 {
				pg := testenv.NewEmptyPostgres(t)
				ctx := context.Background()
				if from > 0 {
					db, err := sql.Open("pgx", pg.URL)
					testenv.Must(t, err, "open")
					_, err = schemas.MigratePostgresTo(ctx, db, from)
					db.Close()
					testenv.Must(t, err, "migrate to the old version")
				}
				var wg sync.WaitGroup
				errs := make([]error, 4)
				for i := range errs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						db, err := sql.Open("pgx", pg.URL)
						if err != nil {
							errs[i] = err
							return
						}
						defer db.Close()
						var v int64
						if v, err = schemas.MigratePostgres(ctx, db); err == nil && v != last {
							err = fmt.Errorf("at version %d, want %d", v, last)
						}
						errs[i] = err
					}()
				}
				wg.Wait()
				for i, err := range errs {
					if err != nil {
						t.Fatalf("round %d: process %d of 4 failed to start: %v", round, i+1, err)
					}
				}
			}
		})
	}
}

// TestKeyAndSubscriptionTimesStayWithinYear9999 checks the bounds on the
// times an operator may set by hand: past the year 9999 (or infinity) a
// time has no RFC 3339 form, and one such row broke the admin views that
// list it. A row written before the bounds does not stop an upgrade.
func TestKeyAndSubscriptionTimesStayWithinYear9999(t *testing.T) {
	pg := testenv.NewEmptyPostgres(t)
	db, err := sql.Open("pgx", pg.URL)
	testenv.Must(t, err, "open")
	defer db.Close()
	ctx := context.Background()
	_, err = schemas.MigratePostgresTo(ctx, db, 140)
	testenv.Must(t, err, "migrate to 140")
	_, err = db.ExecContext(ctx, `INSERT INTO accounts (id, name) VALUES ('acct_1', 'A');
		INSERT INTO environments (account_id, mode) VALUES ('acct_1', 'live');
		INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name, expires_at)
		VALUES ('key_old', 'acct_1', 'live', 'secret', 'sk_live_old', sha256('key_old'), '{}', 'old', 'infinity');
		INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name, expires_at)
		VALUES ('key_far', 'acct_1', 'live', 'secret', 'sk_live_far', sha256('key_far'), '{}', 'far', '12000-01-01 00:00:00+00');
		INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name, expires_at)
		VALUES ('key_past', 'acct_1', 'live', 'secret', 'sk_live_pas', sha256('key_past'), '{}', 'past', '-infinity');
		INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at, ends_at)
		VALUES ('sub_old', 'acct_1', 'free', 1, '-infinity', 'infinity')`)
	testenv.Must(t, err, "rows at version 140")
	_, err = schemas.MigratePostgres(ctx, db)
	testenv.Must(t, err, "migrate forward over rows past the bounds")

	t.Run("rows written out of range before the bounds are brought into range, audited, and can be revoked", func(t *testing.T) {
		for id, want := range map[string]string{"key_old": "never", "key_far": "9999-12-31T23:59:59Z", "key_past": "0001-01-01T00:00:00Z"} {
			var at sql.NullTime
			testenv.Must(t, db.QueryRowContext(ctx, `SELECT expires_at FROM api_keys WHERE id = $1`, id).Scan(&at), "read "+id)
			got := "never"
			if at.Valid {
				got = at.Time.UTC().Format(time.RFC3339)
			}
			if got != want {
				t.Errorf("%s expires %s after the upgrade, want %s", id, got, want)
			}
			var audited int
			var before string
			testenv.Must(t, db.QueryRowContext(ctx, `SELECT count(*), coalesce(max(details->>'expires_at_before'), '') FROM audit_log
				WHERE key_id = $1 AND action = 'key.expiry_repaired'`, id).Scan(&audited, &before), "audit of "+id)
			if wantBefore := map[string]string{"key_old": "infinity", "key_far": "12000-01-01", "key_past": "-infinity"}[id]; audited != 1 || !strings.HasPrefix(before, wantBefore) {
				t.Errorf("%s: %d audit entries of its repair, the expiry before %q; want 1, and %q", id, audited, before, wantBefore)
			}
			// A revoke is an UPDATE of the row: Postgres checks the bounds
			// on the row's new version.
			if _, err := db.ExecContext(ctx, `UPDATE api_keys SET revoked_at = now() WHERE id = $1`, id); err != nil {
				t.Errorf("revoking %s after the upgrade: %v", id, err)
			}
		}
		var starts time.Time
		var ends sql.NullTime
		testenv.Must(t, db.QueryRowContext(ctx, `SELECT starts_at, ends_at FROM subscriptions WHERE id = 'sub_old'`).Scan(&starts, &ends), "read sub_old")
		if starts.UTC().Format(time.RFC3339) != "0001-01-01T00:00:00Z" || ends.Valid {
			t.Errorf("sub_old runs from %s to %v after the upgrade, want from the year 1, without an end", starts.UTC(), ends)
		}
		var subBefore string
		testenv.Must(t, db.QueryRowContext(ctx, `SELECT coalesce(max(details->>'starts_at_before') || ' ' || max(details->>'ends_at_before'), '')
			FROM audit_log WHERE action = 'subscription.bounds_repaired' AND details->>'subscription_id' = 'sub_old'`).Scan(&subBefore), "audit of sub_old")
		if subBefore != "-infinity infinity" {
			t.Errorf("sub_old's repair is audited with %q before, want \"-infinity infinity\"", subBefore)
		}
		var unvalidated int
		testenv.Must(t, db.QueryRowContext(ctx, `SELECT count(*) FROM pg_constraint WHERE conname IN
			('api_keys_expires_at_in_range', 'subscriptions_bounds_in_range') AND NOT convalidated`).Scan(&unvalidated), "read the constraints")
		if unvalidated != 0 {
			t.Errorf("%d of the bounds are not validated", unvalidated)
		}
	})

	insertKey := func(id, expires string) error {
		_, err := db.ExecContext(ctx, `INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name, expires_at)
			VALUES ($1::text, 'acct_1', 'live', 'secret', $1::text, sha256(convert_to($1::text, 'UTF8')), '{}', 'k', $2::timestamptz)`, id, expires)
		return err
	}
	insertSub := func(id, starts, ends string) error {
		_, err := db.ExecContext(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at, ends_at)
			VALUES ($1, 'acct_1', 'free', 1, $2::timestamptz, $3::timestamptz)`, id, starts, ends)
		return err
	}
	refused := func(t *testing.T, err error) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "check constraint") {
			t.Fatalf("got %v, want the row refused by its check constraint", err)
		}
	}
	t.Run("a key expiring in the year 9999 is kept", func(t *testing.T) {
		testenv.Must(t, insertKey("key_9999", "9999-12-31 23:59:59+00"), "insert")
	})
	t.Run("a key without an expiry is kept", func(t *testing.T) {
		_, err := db.ExecContext(ctx, `INSERT INTO api_keys (id, account_id, environment, kind, display_prefix, hash, scopes, name)
			VALUES ('key_never', 'acct_1', 'live', 'secret', 'key_never', sha256('key_never'), '{}', 'k')`)
		testenv.Must(t, err, "insert")
	})
	t.Run("a key expiring in the year 10000 is refused", func(t *testing.T) {
		refused(t, insertKey("key_10000", "10000-01-01 00:00:00+00"))
	})
	t.Run("a key expiring at infinity is refused", func(t *testing.T) {
		refused(t, insertKey("key_inf", "infinity"))
	})
	t.Run("an expiry moved past the year 9999 by hand is refused", func(t *testing.T) {
		_, err := db.ExecContext(ctx, `UPDATE api_keys SET expires_at = '20000-01-01' WHERE id = 'key_9999'`)
		refused(t, err)
	})
	t.Run("a subscription without an end is kept", func(t *testing.T) {
		_, err := db.ExecContext(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at)
			VALUES ('sub_open', 'acct_1', 'free', 1, now())`)
		testenv.Must(t, err, "insert")
	})
	t.Run("a subscription ending at infinity is refused", func(t *testing.T) {
		refused(t, insertSub("sub_inf", "2026-01-01", "infinity"))
	})
	t.Run("a subscription starting at -infinity is refused", func(t *testing.T) {
		refused(t, insertSub("sub_neg", "-infinity", "2027-01-01"))
	})
}
