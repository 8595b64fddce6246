package postgres_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
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
	// The one not backfilled again has its rows under its stored
	// definition, and its record now says so: the file's old definition
	// put back later is a change, rolled up anew.
	var def string
	testenv.Must(t, pg.Pool.QueryRow(ctx, "SELECT definition::text FROM config_meters WHERE key = 'before_the_backfill'").Scan(&def), "read the record")
	if !strings.Contains(def, "/v1/b") {
		t.Fatalf("record of before_the_backfill %s, want its stored (filtered) definition", def)
	}
	added, changed, err := aggpg.NewMeters(pg.Pool).ConfigState(ctx, []meter.Meter{{Key: "before_the_backfill", EventType: "api_call", Aggregation: meter.Count}})
	testenv.Must(t, err, "config state")
	if len(added) != 0 || len(changed) != 1 {
		t.Fatalf("the file's definition put back: added %v, changed %v; want it changed", added, changed)
	}
}

// A finished rebuild settles what it rebuilt in the records of rebuilds
// that started before it, meter by meter, and never touches the record
// of one that started after it (still running: it may delete rows this one
// rebuilt). Reconcile drops from the records the meters no longer defined.
func TestARebuildSettlesOnlyWhatItRebuiltOfEarlierRecords(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	m := aggpg.NewMeters(pg.Pool)
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		testenv.Must(t, err, "parse time")
		return v
	}
	jan, jun := at("2026-01-01T00:00:00Z"), at("2026-06-01T00:00:00Z")
	pending := func() map[string][]string {
		t.Helper()
		ps, err := m.PendingRebuilds(ctx)
		testenv.Must(t, err, "read pending rebuilds")
		out := map[string][]string{}
		for _, p := range ps {
			out[p.ID.String()] = p.Meters
		}
		return out
	}
	start := func(id uuid.UUID, meters []string, from, to time.Time) time.Time {
		t.Helper()
		started, err := m.RebuildStarting(ctx, id, meters, from, to)
		testenv.Must(t, err, "record a rebuild")
		time.Sleep(10 * time.Millisecond) // started_at: now() of each statement
		return started
	}
	killed, whole, later := uuid.New(), uuid.New(), uuid.New()
	start(killed, []string{"api_calls", "bytes"}, jan, jun)
	wholeStarted := start(whole, []string{"api_calls"}, jan, jun)
	laterStarted := start(later, []string{"api_calls"}, at("2026-03-01T00:00:00Z"), at("2026-04-01T00:00:00Z"))
	testenv.Must(t, m.RebuildFinished(ctx, whole, wholeStarted, []string{"api_calls"}, jan, jun), "finish the rebuild of api_calls")
	got := pending()
	if len(got) != 2 || !slices.Equal(got[killed.String()], []string{"bytes"}) || !slices.Equal(got[later.String()], []string{"api_calls"}) {
		t.Fatalf("pending %v; want the killed rebuild left with bytes, and the later one whole", got)
	}
	unfinished, err := m.Unfinished(ctx, nil)
	testenv.Must(t, err, "unfinished")
	if !unfinished["bytes"] || !unfinished["api_calls"] {
		t.Fatalf("backfilling %v, want bytes (killed) and api_calls (the later rebuild, running)", unfinished)
	}
	testenv.Must(t, m.RebuildFinished(ctx, later, laterStarted, []string{"api_calls"}, at("2026-03-01T00:00:00Z"), at("2026-04-01T00:00:00Z")), "finish the later rebuild")
	// bytes is no meter's any longer: its rows are no one's to rebuild.
	_, _, err = m.Reconcile(ctx, []meter.Meter{meter.Default()})
	testenv.Must(t, err, "reconcile")
	if got := pending(); len(got) != 0 {
		t.Fatalf("pending %v once bytes is no meter's, want none", got)
	}
	// A, B and C over one range, started in that order: B finishes first
	// and settles A's record; A, finishing without a record of its own,
	// still leaves C's alone (before, it took its start to be now).
	a, b, c := uuid.New(), uuid.New(), uuid.New()
	aStarted := start(a, []string{"api_calls"}, jan, jun)
	bStarted := start(b, []string{"api_calls"}, jan, jun)
	start(c, []string{"api_calls"}, jan, jun)
	testenv.Must(t, m.RebuildFinished(ctx, b, bStarted, []string{"api_calls"}, jan, jun), "finish B")
	testenv.Must(t, m.RebuildFinished(ctx, a, aStarted, []string{"api_calls"}, jan, jun), "finish A")
	if got := pending(); len(got) != 1 || got[c.String()] == nil {
		t.Fatalf("pending %v; want C's record, still running, left alone", got)
	}
}
