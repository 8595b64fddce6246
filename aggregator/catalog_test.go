package aggregator_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
)

// Ingest's catalog fails a read that is due while the stored meters cannot
// be read, so its rollups wait for Postgres; the usage API's serves the
// meters it has. Before, ingest rolled up with its old list for as long as
// Postgres was out of reach, and a meter created meanwhile, recorded as
// backfilled, lacked every event ingest landed after the backfill's last
// pass.
func TestIngestsCatalogWaitsForAMeterListItCannotRefresh(t *testing.T) {
	ctx := context.Background()
	pg := testenv.NewPostgres(t)
	pool, err := pgxpool.New(ctx, pg.URL)
	testenv.Must(t, err, "second pool")
	const refresh = 50 * time.Millisecond
	serving, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, aggpg.NewMeters(pool), refresh, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "serving catalog")
	rolling, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, aggpg.NewMeters(pool), refresh, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "ingest's catalog")
	rolling.RequireFresh()
	for _, c := range []*aggregator.Catalog{serving, rolling} {
		if ms, err := c.Meters(ctx); err != nil || len(ms) != 1 {
			t.Fatalf("first load: %d meters, %v; want the configured one", len(ms), err)
		}
	}
	_, err = aggpg.NewMeters(pg.Pool).Create(ctx, meter.Meter{Key: "new_meter", EventType: "api_call", Aggregation: meter.Count})
	testenv.Must(t, err, "create a meter")
	pool.Close() // the catalogs' Postgres is out of reach from now on
	time.Sleep(2 * refresh)
	if ms, err := serving.Meters(ctx); err != nil || len(ms) != 1 {
		t.Errorf("the usage API's catalog with Postgres out of reach: %d meters, %v; want the one it had", len(ms), err)
	}
	if ms, err := rolling.Meters(ctx); err == nil {
		t.Errorf("ingest's catalog with Postgres out of reach past its refresh answered %d meters; want an error, so rollups wait", len(ms))
	}
}
