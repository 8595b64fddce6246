package postgres_test

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// trust records what the listener tells the cache.
type trust struct{ trusted atomic.Bool }

func (c *trust) Invalidate(edge.Invalidation) {}
func (c *trust) SetTrusted(b bool)            { c.trusted.Store(b) }

// A LISTEN connection whose peer goes silent, without a close or a reset,
// must stop the cache being trusted within about a second (two heartbeats): a change made
// meanwhile (a revocation) would otherwise go unseen until TCP gave up,
// minutes later.
func TestListenerNoticesASilentConnectionWithinASecond(t *testing.T) {
	f, silent := testenv.NewPostgres(t).Freezable(t)
	c := &trust{}
	l := edgepg.NewListener(silent, c, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	testenv.Must(t, l.Start(ctx), "start the listener")
	time.Sleep(time.Second) // a few quiet heartbeats pass on a live connection
	if !c.trusted.Load() || !l.Connected() {
		t.Fatal("a quiet, live connection was given up")
	}
	f.Freeze()
	frozenAt := time.Now()
	// Two heartbeats (0.8 s) plus scheduling on a busy machine; without the
	// heartbeat it is TCP's keepalive, minutes.
	testenv.Wait(t, 3*time.Second, "the cache no longer trusted", func() bool { return !c.trusted.Load() })
	t.Logf("the silent connection was noticed after %s", time.Since(frozenAt).Round(time.Millisecond))
}
