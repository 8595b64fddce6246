package postgres_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

func TestZones(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	for id, tz := range map[string]string{"acct_tokyo": "Asia/Tokyo", "acct_mars": "Mars/Olympus_Mons", "acct_local": "Local"} {
		_, err := pg.Pool.Exec(ctx, `INSERT INTO accounts (id, name, timezone) VALUES ($1, $1, $2)`, id, tz)
		testenv.Must(t, err, "insert account")
	}
	z := aggpg.NewZones(pg.Pool, time.Nanosecond, slog.New(slog.DiscardHandler))
	// "Local" loads in Go, as each machine's own zone, and not in ClickHouse.
	all := []string{"acct_tokyo", "acct_mars", "acct_local", "acct_unknown"}

	t.Run("an account whose zone does not load follows UTC and the others are answered", func(t *testing.T) {
		got, err := z.Zones(ctx, all)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got["acct_tokyo"] != "Asia/Tokyo" {
			t.Fatalf("zones %v, want only acct_tokyo in Asia/Tokyo", got)
		}
	})
	pg.Pool.Close()
	t.Run("with Postgres unreadable, answers past their TTL are used", func(t *testing.T) {
		got, err := z.Zones(ctx, all)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got["acct_tokyo"] != "Asia/Tokyo" {
			t.Fatalf("zones %v, want acct_tokyo in Asia/Tokyo from the cache", got)
		}
	})
	t.Run("with Postgres unreadable, an account never answered is an error", func(t *testing.T) {
		if got, err := z.Zones(ctx, []string{"acct_new"}); err == nil {
			t.Fatalf("zones %v and no error for an account never read", got)
		}
	})
}

// Reconcile backfills a stored meter again only when the configuration
// file's roll-up of another definition came after its finished backfill:
// a backfill that finished before backfills were recorded in config_meters
// (an upgrade) computed the rows under its own definition already, and
// rebuilding them would only empty its windows for a while.
func TestReconcileBackfillsAgainOnlyWhatTheFileRolledUpLater(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	fileDef := `{"key":"%s","event_type":"api_call","aggregation":"COUNT"}`
	storedDef := `{"key":"%s","event_type":"api_call","aggregation":"COUNT","filters":[{"property":"route","values":["/v1/b"]}]}`
	for _, c := range []struct {
		key                    string
		rolledUp, backfilledAt string
	}{
		{"after_the_backfill", "now() - interval '1 day'", "now() - interval '2 days'"},
		{"before_the_backfill", "now() - interval '2 days'", "now() - interval '1 day'"},
	} {
		_, err := pg.Pool.Exec(ctx, fmt.Sprintf(`INSERT INTO config_meters (key, definition, rolled_up_at) VALUES ($1, $2, %s)`, c.rolledUp),
			c.key, fmt.Sprintf(fileDef, c.key))
		testenv.Must(t, err, "record the file's roll-up")
		_, err = pg.Pool.Exec(ctx, fmt.Sprintf(`INSERT INTO meters (key, definition, backfilled_at) VALUES ($1, $2, %s)`, c.backfilledAt),
			c.key, fmt.Sprintf(storedDef, c.key))
		testenv.Must(t, err, "store the meter")
	}
	_, again, err := aggpg.NewMeters(pg.Pool).Reconcile(ctx, nil)
	testenv.Must(t, err, "reconcile")
	if len(again) != 1 || again[0] != "after_the_backfill" {
		t.Fatalf("backfilled again %v, want only the meter whose rows the file rolled up after its backfill", again)
	}
	var unfinished []string
	rows, err := pg.Pool.Query(ctx, "SELECT key FROM meters WHERE backfilled_at IS NULL ORDER BY key")
	testenv.Must(t, err, "read meters")
	for rows.Next() {
		var k string
		testenv.Must(t, rows.Scan(&k), "scan")
		unfinished = append(unfinished, k)
	}
	if len(unfinished) != 1 || unfinished[0] != "after_the_backfill" {
		t.Fatalf("meters to backfill %v, want [after_the_backfill]", unfinished)
	}
}
