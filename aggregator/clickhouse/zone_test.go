package clickhouse_test

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/aggregator/aggregatortest"
	"github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// goOnlyZone is a zone Go loads (from the system's tzdata) and ClickHouse
// refuses, 18.16 and current releases alike.
const goOnlyZone = "right/UTC"

func TestCheckZone(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	store := clickhouse.NewStore(ch.Conn)
	for _, c := range []struct {
		name, zone string
		refused    bool
	}{
		{"UTC is used", "UTC", false},
		{"a zone ClickHouse knows is used", "Asia/Kolkata", false},
		{"a zone ClickHouse's tzdata lacks is refused", goOnlyZone, true},
		{"an unknown zone is refused", "Mars/Olympus_Mons", true},
		{"a name that is no zone name is refused", "UTC'); DROP TABLE x; --", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := store.CheckZone(context.Background(), c.zone)
			if c.refused != errors.Is(err, aggregator.ErrZoneRefused) || (!c.refused && err != nil) {
				t.Fatalf("CheckZone(%q) = %v, want refused=%v", c.zone, err, c.refused)
			}
		})
	}
}

// TestAZoneClickHouseRefusesIsRolledUpInUTC lands, in one rollup round,
// the events of an account whose zone Go loads and ClickHouse does not and
// those of accounts in ordinary zones. Every window expression naming the
// zone used to fail in ClickHouse, and the round's shared INSERT with it:
// every batch of the round failed, for every account, on every retry. Now
// that account is rolled up in UTC and the others in their own zones, by
// ingest's recomputes and by a rebuild alike.
func TestAZoneClickHouseRefusesIsRolledUpInUTC(t *testing.T) {
	if _, err := caltime.LoadZone(goOnlyZone); err != nil {
		t.Fatalf("Go does not load %s here: it comes with the system's time zone data (on Debian and Ubuntu the tzdata package, or tzdata-legacy where right/ zones moved there): %v", goOnlyZone, err)
	}
	ch := testenv.NewClickHouse(t)
	ctx := context.Background()
	store := clickhouse.NewStore(ch.Conn)
	log := slog.New(slog.DiscardHandler)
	stored := aggregator.StaticZones{"acct_tokyo": goOnlyZone, "acct_kolkata": "Asia/Kolkata"}
	used := aggregator.StaticZones{"acct_kolkata": "Asia/Kolkata"}
	events := aggregatortest.GenEvents(rand.New(rand.NewPCG(9, 10)), 1500, time.Now().UTC())
	var bad, good []schemas.Event
	for _, e := range events {
		if e.AccountID == "acct_tokyo" {
			bad = append(bad, e)
		} else {
			good = append(good, e)
		}
	}
	batches := [][]schemas.Event{bad, good}
	testenv.Must(t, chsink.NewSink(ch.Conn).Insert(ctx, aggregatortest.Records(bad), aggregatortest.Records(good)), "insert raw")
	co := aggregator.NewCoalescer(aggregator.NewRoller(aggregator.StaticMeters(testMeters), stored, store, log))
	defer co.Close()
	errs := make([]error, len(batches))
	var wg sync.WaitGroup
	for i, b := range batches {
		wg.Go(func() {
			lctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			errs[i] = co.Landed(lctx, aggregatortest.Records(b))
		})
	}
	wg.Wait()
	for i, who := range []string{"the account in " + goOnlyZone, "the other accounts"} {
		if errs[i] != nil {
			t.Errorf("rollups of %s failed: %v", who, errs[i])
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	compareAllIn(t, store, events, used)

	testenv.Must(t, ch.Conn.Exec(ctx, "TRUNCATE TABLE usage_rollups"), "truncate rollups")
	testenv.Must(t, aggregator.RebuildAll(ctx, store, stored, testMeters, time.Time{}, time.Time{}, log), "rebuild")
	compareAllIn(t, store, events, used)
}
