package main

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// inZone is evs with account's windows moved to zone's grid.
func inZone(t *testing.T, evs []rebuildEvent, account, zone string) []rebuildEvent {
	t.Helper()
	loc, err := time.LoadLocation(zone)
	testenv.Must(t, err, "load "+zone)
	out := make([]rebuildEvent, len(evs))
	for i, e := range evs {
		if e.account == account {
			l := mustTime(t, e.at).In(loc)
			e.hour = time.Date(l.Year(), l.Month(), l.Day(), l.Hour(), 0, 0, 0, loc).UTC().Format(time.RFC3339)
			e.day = time.Date(l.Year(), l.Month(), l.Day(), 0, 0, 0, 0, loc).UTC().Format(time.RFC3339)
			e.month = time.Date(l.Year(), l.Month(), 1, 0, 0, 0, 0, loc).UTC().Format(time.RFC3339)
		}
		out[i] = e
	}
	return out
}

// landRolledUpEvents is landRebuildEvents with every rollup computed, in
// each account's zone.
func landRolledUpEvents(t *testing.T) (*testenv.Postgres, *testenv.ClickHouse, []rebuildEvent) {
	t.Helper()
	pg, ch, evs := landRebuildEvents(t)
	log := quietLog()
	testenv.Must(t, aggregator.RebuildAll(context.Background(), aggch.NewStore(ch.Conn), aggpg.NewZones(pg.Pool, time.Minute, log),
		rebuildMeters, time.Time{}, time.Time{}, log), "roll up the events in their accounts' zones")
	compareRollups(t, "before the change", readRollups(t, ch), expectedRollups(t, evs))
	return pg, ch, evs
}

// TestAnAccountsZoneChangeReRollsItsRollups: an account's hour, day and
// month rollups are on its zone's grid. After its zone changes, an event
// rolled up on the new grid sat beside the old grid's rows, and a month
// counted the hours of both until an operator ran a rebuild. The
// aggregator now re-rolls the account's coarser windows by itself, once
// every process has had zone_cache_ttl (plus 2 s) to read the new zone,
// and leaves the other accounts' rows alone.
func TestAnAccountsZoneChangeReRollsItsRollups(t *testing.T) {
	pg, ch, evs := landRolledUpEvents(t)
	ctx := context.Background()
	log := quietLog()
	store := aggch.NewStore(ch.Conn)

	// The configuration file's meters as rolled up already, so that the
	// aggregator does not replace them itself (rollUpConfigMeters).
	// Long enough that the first pass's wait without it (2 s) shows.
	ttl := 3 * time.Second
	cfg := testConfig(t, pg, ch, "unused")
	cfg.Meters = rebuildMeters[:1]
	cfg.Aggregator.ZoneCacheTTL = ttl
	created, err := aggpg.NewMeters(pg.Pool).Create(ctx, rebuildMeters[1])
	testenv.Must(t, err, "store the admin-API meter")
	if !created {
		t.Fatal("the admin-API meter was not created")
	}
	testenv.Must(t, aggpg.NewMeters(pg.Pool).ConfigRolledUp(ctx, rebuildMeters[0]), "record the configured meter as rolled up")
	_, err = pg.Pool.Exec(ctx, "UPDATE meters SET backfilled_at = now()")
	testenv.Must(t, err, "record the admin-API meter as backfilled")

	m, err := NewAggregateMain(ctx, cfg, log)
	testenv.Must(t, err, "start the aggregator")
	// The second pass waits until the test has landed a stale round.
	m.rezoneSettle.Store(int64(time.Hour))
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		<-done
		_ = m.Close()
	})

	// The usage API says while the account's windows are owed a re-roll.
	store2 := edgepg.NewKeyStore(pg.Pool)
	secret, parsed, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate key")
	testenv.Must(t, store2.EnsureAccount(ctx, "acct_kolkata", "Kolkata"), "give the account its environments")
	testenv.Must(t, store2.CreateKey(ctx, edgepg.NewKey{ID: "key_rezone", AccountID: "acct_kolkata", Parsed: parsed}), "create key")
	rezoning := func(window string) bool {
		t.Helper()
		span := "&from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z"
		if window == "minute" {
			span = "&from=2026-01-31T18:00:00Z&to=2026-01-31T19:00:00Z"
		}
		req, err := http.NewRequest(http.MethodGet, "http://"+m.Addr()+"/v1/usage?meter=api_calls&window="+window+span, nil)
		testenv.Must(t, err, "usage request")
		req.Header.Set("Authorization", "Bearer "+secret)
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "usage")
		defer resp.Body.Close()
		var body struct {
			Rezoning        bool       `json:"rezoning"`
			CompleteThrough *time.Time `json:"complete_through"`
		}
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&body) != nil {
			t.Fatalf("usage (window %s): status %d", window, resp.StatusCode)
		}
		if body.Rezoning && body.CompleteThrough != nil {
			t.Errorf("usage (window %s) says rezoning and complete through %v", window, body.CompleteThrough)
		}
		return body.Rezoning
	}
	if rezoning("day") {
		t.Fatal("the usage API says rezoning before the zone changed")
	}

	const zone = "America/New_York"
	_, err = pg.Pool.Exec(ctx, "UPDATE accounts SET timezone = $1 WHERE id = 'acct_kolkata'", zone)
	testenv.Must(t, err, "change the account's zone")
	// The answer before the change may be cached for up to a second.
	testenv.Wait(t, 2*time.Second, "the usage API to say the day windows are rezoning", func() bool { return rezoning("day") })
	if rezoning("minute") {
		t.Error("the usage API says minute windows are rezoning; a zone change does not move them")
	}
	// An event after the change, rolled up by an ingest process that has
	// the new zone already: its windows on the new grid join the old
	// grid's rows.
	late := rebuildEvent{account: "acct_kolkata", env: "live", typ: "api_call", route: "/v1/b", bytes: 9, at: "2026-01-31T20:00:00Z"}
	late.id = evs[0].id
	late.id[0] ^= 0xff
	insertRebuildEvents(t, ch, []rebuildEvent{late})
	roller := aggregator.NewRoller(aggregator.StaticMeters(rebuildMeters), aggregator.StaticZones{"acct_kolkata": zone}, store, log)
	testenv.Must(t, roller.Landed(ctx, []ingest.Record{{Event: schemas.Event{AccountID: "acct_kolkata", Environment: schemas.Live,
		Type: "api_call", Time: mustTime(t, late.at)}}}), "roll up the event after the change")

	// The first pass: recorded once it has run, zone_cache_ttl plus 2 s
	// after the change at the earliest, with every row on the new grid.
	var changed, firstPass time.Time
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var at *time.Time
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT timezone_changed_at, rollups_first_pass_at FROM accounts WHERE id = 'acct_kolkata'`).
			Scan(&changed, &at), "read the account")
		if at != nil {
			firstPass = *at
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first pass of the re-roll did not run within 60 s")
		}
	}
	if wait := firstPass.Sub(changed); wait < ttl+2*time.Second {
		t.Errorf("the first pass ran %v after the zone change; every process has the new zone only after zone_cache_ttl (%v) plus 2 s", wait, ttl)
	}
	want := expectedRollups(t, inZone(t, append(evs, late), "acct_kolkata", zone))
	compareRollups(t, "after the first pass", readRollups(t, ch), want)
	if !rezoning("month") {
		t.Error("the usage API stopped saying rezoning before the second pass")
	}
	// A round an ingest process planned with the old zone just before it
	// could see the change lands its rows after the first pass; the second
	// replaces them.
	stale := aggregator.NewRoller(aggregator.StaticMeters(rebuildMeters), aggregator.StaticZones{"acct_kolkata": "Asia/Kolkata"}, store, log)
	testenv.Must(t, stale.Landed(ctx, []ingest.Record{{Event: schemas.Event{AccountID: "acct_kolkata", Environment: schemas.Live,
		Type: "api_call", Time: mustTime(t, evs[0].at)}}}), "roll up a round planned with the old zone")
	var early bool
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT rollups_rezoned_for IS NOT DISTINCT FROM timezone_changed_at
		FROM accounts WHERE id = 'acct_kolkata'`).Scan(&early), "read the account")
	if early {
		t.Fatal("the rezone was recorded done before its second pass could run")
	}
	m.rezoneSettle.Store(0)
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var done bool
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT rollups_rezoned_for IS NOT DISTINCT FROM timezone_changed_at
			FROM accounts WHERE id = 'acct_kolkata'`).Scan(&done), "read the account")
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the account's rollups were not re-rolled onto its new zone within 60 s")
		}
	}
	compareRollups(t, "after the change", readRollups(t, ch), want)
	testenv.Wait(t, 2*time.Second, "the usage API to stop saying rezoning", func() bool { return !rezoning("month") })
}

// landingStore lands an event just before the rezone's deletion: ingest
// rolls it up on the new grid meanwhile, and the deletion takes its hour,
// day and month rows with the rest.
type landingStore struct {
	*aggch.Store
	land func()
}

func (s landingStore) DeleteCoarseRollups(ctx context.Context, account string, meters []string) error {
	s.land()
	return s.Store.DeleteCoarseRollups(ctx, account, meters)
}

// TestARezoneRebuildsAMinuteThatLandsAsItDeletes: the rezone read the
// account's last minute before its deletion and rebuilt up to it, so an
// event that landed in a new hour between the two lost its hour row, and
// its day and month stayed short for good.
func TestARezoneRebuildsAMinuteThatLandsAsItDeletes(t *testing.T) {
	_, ch, evs := landRolledUpEvents(t)
	ctx := context.Background()
	log := quietLog()
	store := aggch.NewStore(ch.Conn)
	const zone = "America/New_York"
	late := rebuildEvent{account: "acct_kolkata", env: "live", typ: "api_call", route: "/v1/a", bytes: 11, at: "2026-01-31T22:10:00Z"}
	late.id = evs[0].id
	late.id[1] ^= 0xff
	roller := aggregator.NewRoller(aggregator.StaticMeters(rebuildMeters), aggregator.StaticZones{"acct_kolkata": zone}, store, log)
	landing := landingStore{Store: store, land: func() {
		insertRebuildEvents(t, ch, []rebuildEvent{late})
		testenv.Must(t, roller.Landed(ctx, []ingest.Record{{Event: schemas.Event{AccountID: "acct_kolkata", Environment: schemas.Live,
			Type: "api_call", Time: mustTime(t, late.at)}}}), "roll up the event landing meanwhile")
	}}
	testenv.Must(t, aggregator.Rezone(ctx, landing, aggregator.StaticZones{"acct_kolkata": zone}, rebuildMeters, "acct_kolkata", log), "rezone")
	compareRollups(t, "after the rezone", readRollups(t, ch), expectedRollups(t, inZone(t, append(evs, late), "acct_kolkata", zone)))
}

// While another aggregator holds an account's rezone, this one waits for
// it without starting its own wait over (it logged the change again and
// waited zone_cache_ttl anew each time), then does the pass itself once
// the lock is free and the rezone still owed.
func TestARezoneHeldElsewhereIsWaitedFor(t *testing.T) {
	pg, ch, _ := landRolledUpEvents(t)
	ctx := context.Background()
	log := quietLog()
	cfg := testConfig(t, pg, ch, "unused")
	cfg.Meters = rebuildMeters[:1]
	cfg.Aggregator.ZoneCacheTTL = 10 * time.Millisecond
	m, err := NewAggregateMain(ctx, cfg, log)
	testenv.Must(t, err, "start the aggregator")
	t.Cleanup(func() { _ = m.Close() })

	_, err = pg.Pool.Exec(ctx, "UPDATE accounts SET timezone = 'America/New_York' WHERE id = 'acct_kolkata'")
	testenv.Must(t, err, "change the account's zone")
	seen := map[string]*rezoneSeen{}
	m.rezoneDue(seen)
	first := seen["acct_kolkata"]
	if first == nil {
		t.Fatal("the zone change was not seen")
	}
	other, ok, err := aggpg.NewRezones(pg.Pool).Lock(ctx, "acct_kolkata")
	testenv.Must(t, err, "take the rezone as another aggregator")
	if !ok {
		t.Fatal("the rezone's lock was taken already")
	}
	time.Sleep(time.Until(first.due) + 100*time.Millisecond)
	due := first.due
	for range 3 {
		m.rezoneDue(seen)
		if s := seen["acct_kolkata"]; s != first || !s.due.Equal(due) || s.failures != 0 {
			t.Fatalf("while another aggregator holds the rezone: %+v, want the entry as it was (due %v)", s, due)
		}
	}
	other.Release()
	m.rezoneDue(seen)
	var firstRun bool
	testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT rollups_first_pass_for IS NOT DISTINCT FROM timezone_changed_at
		FROM accounts WHERE id = 'acct_kolkata'`).Scan(&firstRun), "read the account")
	if !firstRun {
		t.Fatal("after the lock was let go, the first pass has not run")
	}
}

// A zone that changes again between the passes starts the rezone over:
// the first pass of the earlier change does not count for the later one.
func TestAZoneChangedBetweenThePassesStartsTheRezoneOver(t *testing.T) {
	pg, ch, evs := landRolledUpEvents(t)
	ctx := context.Background()
	log := quietLog()
	cfg := testConfig(t, pg, ch, "unused")
	cfg.Meters = rebuildMeters
	cfg.Aggregator.ZoneCacheTTL = 10 * time.Millisecond
	m, err := NewAggregateMain(ctx, cfg, log)
	testenv.Must(t, err, "start the aggregator")
	t.Cleanup(func() { _ = m.Close() })
	m.rezoneSettle.Store(int64(time.Hour))
	state := func() (firstFor, changed time.Time, done bool) {
		t.Helper()
		var first *time.Time
		testenv.Must(t, pg.Pool.QueryRow(ctx, `SELECT rollups_first_pass_for, timezone_changed_at,
			rollups_rezoned_for IS NOT DISTINCT FROM timezone_changed_at FROM accounts WHERE id = 'acct_kolkata'`).Scan(&first, &changed, &done), "read the account")
		if first != nil {
			firstFor = *first
		}
		return firstFor, changed, done
	}
	// look runs rezoneDue until the account is seen, then once its wait
	// (2 s past zone_cache_ttl) is over.
	seen := map[string]*rezoneSeen{}
	look := func() {
		t.Helper()
		m.rezoneDue(seen)
		if s := seen["acct_kolkata"]; s != nil {
			time.Sleep(time.Until(s.due) + 50*time.Millisecond)
		}
		m.rezoneDue(seen)
	}

	for _, z := range []string{"America/New_York", "Europe/Berlin"} {
		_, err = pg.Pool.Exec(ctx, "UPDATE accounts SET timezone = $1 WHERE id = 'acct_kolkata'", z)
		testenv.Must(t, err, "change the account's zone to "+z)
		look()
		if first, changed, done := state(); !first.Equal(changed) || done {
			t.Fatalf("after the change to %s: first pass for %v, change at %v, done %v; want its first pass run, not done", z, first, changed, done)
		}
	}
	m.rezoneSettle.Store(0)
	m.rezoneDue(seen)
	if _, _, done := state(); !done {
		t.Fatal("the second pass of the later change did not run")
	}
	compareRollups(t, "after both changes", readRollups(t, ch), expectedRollups(t, inZone(t, evs, "acct_kolkata", "Europe/Berlin")))
}
