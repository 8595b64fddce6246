package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// nopInvalidator takes the listener's notifications and drops them.
type nopInvalidator struct{}

func (nopInvalidator) Invalidate(edge.Invalidation) {}
func (nopInvalidator) SetTrusted(bool)              {}

// A pool setting in services.postgres_url (pool_max_conns), which
// check-config takes, is taken by every connection the components make:
// the migrations', the pool's and the edge's key change listener's. Before,
// the migrations and the listener sent it to the server, which refused the
// login, so nothing started.
func TestAPoolSettingInThePostgresURLIsTakenByEveryConnection(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pg := testenv.NewEmptyPostgres(t)
	sep := "?"
	if strings.Contains(pg.URL, "?") {
		sep = "&"
	}
	url := pg.URL + sep + "pool_max_conns=4"
	testenv.Must(t, checkPostgresURL(url), "check-config's check")
	pool, err := openPostgres(ctx, url)
	testenv.Must(t, err, "open, migrate and pool")
	defer pool.Close()
	if got := pool.Config().MaxConns; got != 4 {
		t.Errorf("the pool's max connections %d, want the URL's 4", got)
	}
	l := edgepg.NewListener(url, nopInvalidator{}, slog.New(slog.DiscardHandler))
	testenv.Must(t, l.Start(ctx), "the key change listener")
	if !l.Connected() {
		t.Error("the key change listener started but is not connected")
	}
}
