package postgres_test

import (
	"context"
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
