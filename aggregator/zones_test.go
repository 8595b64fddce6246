package aggregator_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/tollgate-dev/tollgate/aggregator"
)

// fakeChecker refuses the zones in refuse and fails while down.
type fakeChecker struct {
	refuse map[string]bool
	down   bool
	calls  map[string]int
}

func (f *fakeChecker) CheckZone(_ context.Context, zone string) error {
	f.calls[zone]++
	switch {
	case f.down:
		return errors.New("connection refused")
	case f.refuse[zone]:
		return fmt.Errorf("%w: cannot load %s", aggregator.ErrZoneRefused, zone)
	}
	return nil
}

func TestZonesTheStoreRefusesAreUTC(t *testing.T) {
	stored := aggregator.StaticZones{"a_new": "Europe/Kyiv", "b_new": "Europe/Kyiv", "c_tokyo": "Asia/Tokyo",
		"d_bad": "Not/A_Zone", "e_utc": "UTC"}
	accounts := []string{"a_new", "b_new", "c_tokyo", "d_bad", "e_utc", "f_unknown"}
	check := &fakeChecker{refuse: map[string]bool{"Europe/Kyiv": true}, calls: map[string]int{}}
	zs := aggregator.CheckZones(stored, check)
	get := func() map[string]string {
		t.Helper()
		got, err := zs.Zones(context.Background(), accounts)
		if err != nil {
			t.Fatalf("Zones: %v", err)
		}
		return got
	}

	t.Run("accounts in a refused zone or one Go does not load are left out", func(t *testing.T) {
		got := get()
		want := map[string]string{"c_tokyo": "Asia/Tokyo", "e_utc": "UTC"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("Zones = %v, want %v", got, want)
		}
	})
	t.Run("each zone is checked once, whatever the accounts in it", func(t *testing.T) {
		get()
		if check.calls["Europe/Kyiv"] != 1 || check.calls["Asia/Tokyo"] != 1 || check.calls["UTC"] != 0 || check.calls["Not/A_Zone"] != 0 {
			t.Fatalf("checks: %v", check.calls)
		}
	})
	t.Run("an answer is kept while the store cannot tell", func(t *testing.T) {
		check.down = true
		if got := get(); got["a_new"] != "" || got["c_tokyo"] != "Asia/Tokyo" {
			t.Fatalf("Zones = %v", got)
		}
		check.down = false
	})
	// Asked again, the answer could change (the server's tzdata
	// updated) and move the accounts to another grid mid-month.
	t.Run("an answer is kept for the life of the process", func(t *testing.T) {
		delete(check.refuse, "Europe/Kyiv")
		if got := get(); got["a_new"] != "" || check.calls["Europe/Kyiv"] != 1 {
			t.Fatalf("Zones = %v after the store stopped refusing, checks %v; want the refusal kept, asked once", got, check.calls)
		}
	})
	t.Run("a zone never answered fails while the store cannot tell", func(t *testing.T) {
		check.down = true
		_, err := aggregator.CheckZones(stored, check).Zones(context.Background(), accounts)
		if err == nil {
			t.Fatal("no error")
		}
	})
}
