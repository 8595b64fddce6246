package aggregator_test

import (
	"context"
	"log/slog"
	"strings"
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

// A stored meter whose definition does not decode is left out and named,
// as one this version refuses is: the others are rolled up and served.
// Before, the whole list failed, and with ingest's catalog waiting for a
// list it can read, one such row stopped every ingest.
func TestAStoredMeterThatDoesNotDecodeIsLeftOut(t *testing.T) {
	ctx := context.Background()
	pg := testenv.NewPostgres(t)
	_, err := aggpg.NewMeters(pg.Pool).Create(ctx, meter.Meter{Key: "good_meter", EventType: "api_call", Aggregation: meter.Count})
	testenv.Must(t, err, "create a meter")
	_, err = pg.Pool.Exec(ctx, `INSERT INTO meters (key, definition) VALUES ('odd_meter', '{"key": "odd_meter", "group_by": "route"}')`)
	testenv.Must(t, err, "store a definition that does not decode")
	c, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, aggpg.NewMeters(pg.Pool), time.Minute, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	c.RequireFresh()
	ms, err := c.Meters(ctx)
	if err != nil || len(ms) != 2 {
		t.Fatalf("meters with one stored row that does not decode: %d, %v; want the configured one and good_meter", len(ms), err)
	}
	refused, err := c.Refused(ctx)
	if err != nil || len(refused) != 1 || refused[0].Key != "odd_meter" || !strings.Contains(refused[0].Reason, "does not decode") {
		t.Fatalf("refused %+v, %v; want odd_meter, named as not decoding", refused, err)
	}
}
