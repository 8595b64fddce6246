package edge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// A reported event of a type no meter counts (a typo in "type", say) is
// accepted and stored, as before, but its item carries a warning, so the
// client learns that it is in no usage and no invoice. A meter created
// through the admin API for the type ends the warning once the edge's
// meter list is read again.
func TestAReportedEventNoMeterCountsIsWarnedOf(t *testing.T) {
	env := edgetest.New(t)
	catalog, err := aggregator.NewCatalog([]meter.Meter{meter.Default(), {Key: "tokens", EventType: "tokens", Aggregation: meter.Sum, Value: "units"}},
		aggpg.NewMeters(env.PG.Pool), 50*time.Millisecond, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	in := env.Start(t, edgetest.Options{Meters: catalog})
	key, _ := env.Key(t, "acct_unmetered", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	post := func(body string) edge.BatchResult {
		t.Helper()
		r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(body))
		if r.Status != 200 {
			t.Fatalf("status %d: %s", r.Status, r.Body)
		}
		var out edge.BatchResult
		testenv.Must(t, json.Unmarshal(r.Body, &out), "decode")
		return out
	}
	batch := fmt.Sprintf(`{"events":[
		{"id":"u-1","type":"tokens","time":%q,"units":5},
		{"id":"u-2","type":"tokenz","time":%q,"units":5},
		{"id":"u-2","type":"tokenz","time":%q,"units":5}
	]}`, at, at, at)
	// The meters are read in the background: the first read lands within
	// moments of the edge's start.
	var res edge.BatchResult
	testenv.Wait(t, 10*time.Second, "the meters read", func() bool { res = post(batch); return len(res.Results[1].Warnings) > 0 })
	if res.Accepted != 2 || res.Duplicates != 1 {
		t.Fatalf("result %+v, want two accepted and one duplicate", res)
	}
	if len(res.Results[0].Warnings) != 0 {
		t.Errorf("a counted type warned of: %+v", res.Results[0].Warnings)
	}
	for _, i := range []int{1, 2} {
		w := res.Results[i].Warnings
		if len(w) != 1 || w[0].Field != "type" || w[0].Code != schemas.ProblemUnknownEventType || !strings.Contains(w[0].Reason, `"tokenz"`) {
			t.Errorf("item %d (%s): warnings %+v, want one on its type naming tokenz", i, res.Results[i].Status, w)
		}
	}
	_, err = aggpg.NewMeters(env.PG.Pool).Create(context.Background(), meter.Meter{Key: "tokenz", EventType: "tokenz", Aggregation: meter.Sum, Value: "units"})
	testenv.Must(t, err, "create a meter for the type")
	testenv.Wait(t, 10*time.Second, "the warning gone once a meter counts the type", func() bool {
		res := post(fmt.Sprintf(`{"events":[{"id":"u-3","type":"tokenz","time":%q,"units":5}]}`, at))
		return res.Accepted == 1 && len(res.Results[0].Warnings) == 0
	})
}

// stalledMeters is a meter list that never answers, as a Postgres gone
// silent (a failover, a dead host) leaves the catalog's read.
type stalledMeters struct{ reads atomic.Int64 }

func (m *stalledMeters) Meters(ctx context.Context) ([]meter.Meter, error) {
	m.reads.Add(1)
	<-ctx.Done()
	return nil, ctx.Err()
}

// A meter list that cannot be read holds no batch for long: the list is
// read in the background, at most one read a second, and a batch goes on
// without warnings meanwhile; only batches in a read's first 100 ms wait
// for it, and none once a read has failed.
func TestAMeterListThatCannotBeReadHoldsNoBatch(t *testing.T) {
	env := edgetest.New(t)
	stalled := &stalledMeters{}
	in := env.Start(t, edgetest.Options{Meters: stalled})
	key, _ := env.Key(t, "acct_stalled_meters", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	for i := range 20 {
		t0 := time.Now()
		r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(fmt.Sprintf(`{"events":[{"id":"s-%d","type":"tokenz","time":%q}]}`, i, at)))
		var out edge.BatchResult
		testenv.Must(t, json.Unmarshal(r.Body, &out), "decode")
		if r.Status != 200 || out.Accepted != 1 || len(out.Results[0].Warnings) != 0 {
			t.Fatalf("batch %d: %d %+v, want accepted without warnings", i, r.Status, out)
		}
		// A read of the stalled list takes 5 s; a batch that waited on one
		// would take that long.
		if took := time.Since(t0); took > 4*time.Second {
			t.Fatalf("batch %d took %s: it waited on the meter list", i, took)
		}
	}
	if n := stalled.reads.Load(); n != 1 {
		t.Fatalf("%d reads of the meter list under 20 batches while one hangs, want 1", n)
	}
}

// switchedMeters is a meter list a test changes, as a meter created through
// the admin API changes the catalog's.
type switchedMeters struct {
	mu     sync.Mutex
	meters []meter.Meter
}

func (m *switchedMeters) Meters(context.Context) ([]meter.Meter, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.meters), nil
}

// After a spell without reported events, the first batch is not checked
// against the list read before it: a meter created meanwhile would have
// had its events warned of as counted nowhere.
func TestAnOldMeterListWarnsOfNothing(t *testing.T) {
	env := edgetest.New(t)
	list := &switchedMeters{meters: []meter.Meter{meter.Default()}}
	in := env.Start(t, edgetest.Options{Meters: list})
	key, _ := env.Key(t, "acct_old_meters", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	post := func(id string) edge.BatchResult {
		t.Helper()
		r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(fmt.Sprintf(`{"events":[{"id":%q,"type":"tokenz","time":%q}]}`, id, at)))
		var out edge.BatchResult
		testenv.Must(t, json.Unmarshal(r.Body, &out), "decode")
		return out
	}
	testenv.Wait(t, 10*time.Second, "a tokenz event warned of", func() bool { return len(post("o-1").Results[0].Warnings) == 1 })
	list.mu.Lock()
	list.meters = append(list.meters, meter.Meter{Key: "tokenz", EventType: "tokenz", Aggregation: meter.Count})
	list.mu.Unlock()
	time.Sleep(3 * time.Second) // no reported events meanwhile
	if w := post("o-2").Results[0].Warnings; len(w) != 0 {
		t.Fatalf("the first batch after a quiet spell is warned %+v, though a meter counts its type", w)
	}
	// And a client that reports now and then is warned all the same: the
	// batch that finds the list old waits for the read it starts.
	list.mu.Lock()
	list.meters = list.meters[:1]
	list.mu.Unlock()
	time.Sleep(3 * time.Second)
	if w := post("o-3").Results[0].Warnings; len(w) != 1 {
		t.Fatalf("the first batch after a quiet spell, of a type no meter counts any longer: warnings %+v, want one", w)
	}
}

// A catalog that cannot read the meters again (its Postgres out of reach)
// and requires a fresh list, as the edge's does, stops the warnings: a list
// from before the outage may lack a meter created since, and the catalog
// would otherwise answer from it for as long as the outage lasts.
func TestAMeterListThatCanNoLongerBeReadWarnsOfNothing(t *testing.T) {
	env := edgetest.New(t)
	pool, err := pgxpool.New(context.Background(), env.PG.URL)
	testenv.Must(t, err, "the catalog's own pool")
	catalog, err := aggregator.NewCatalog([]meter.Meter{meter.Default()}, aggpg.NewMeters(pool), 50*time.Millisecond, slog.New(slog.DiscardHandler))
	testenv.Must(t, err, "catalog")
	catalog.RequireFresh()
	in := env.Start(t, edgetest.Options{Meters: catalog})
	key, _ := env.Key(t, "acct_lost_meters", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	n := 0
	post := func() []schemas.FieldError {
		t.Helper()
		n++
		r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(fmt.Sprintf(`{"events":[{"id":"l-%d","type":"tokenz","time":%q}]}`, n, at)))
		var out edge.BatchResult
		testenv.Must(t, json.Unmarshal(r.Body, &out), "decode")
		if out.Accepted != 1 {
			t.Fatalf("batch %d: %d %s", n, r.Status, r.Body)
		}
		return out.Results[0].Warnings
	}
	testenv.Wait(t, 10*time.Second, "a tokenz event warned of", func() bool { return len(post()) == 1 })
	pool.Close() // the catalog can no longer read the meters
	testenv.Wait(t, 10*time.Second, "the warnings stopped", func() bool { return len(post()) == 0 })
	for range 10 {
		if w := post(); len(w) != 0 {
			t.Fatalf("a batch while the meters cannot be read is warned: %+v", w)
		}
		time.Sleep(300 * time.Millisecond)
	}
}
