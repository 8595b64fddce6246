package postgres_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/url"
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

// freezer forwards loopback connections to addr until frozen, then drops
// every byte both ways without closing anything: a peer that vanished.
type freezer struct {
	ln     net.Listener
	frozen atomic.Bool
}

func newFreezer(t *testing.T, addr string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	f := &freezer{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { c.Close(); s.Close() })
			go f.pipe(s, c)
			go f.pipe(c, s)
		}
	}()
	return f
}

func (f *freezer) pipe(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !f.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// A LISTEN connection whose peer goes silent, without a close or a reset,
// must stop the cache being trusted within about a second (two heartbeats): a change made
// meanwhile (a revocation) would otherwise go unseen until TCP gave up,
// minutes later.
func TestListenerNoticesASilentConnectionWithinASecond(t *testing.T) {
	pg := testenv.NewPostgres(t)
	u, err := url.Parse(pg.URL)
	testenv.Must(t, err, "parse the database URL")
	f := newFreezer(t, u.Host)
	u.Host = f.ln.Addr().String()
	c := &trust{}
	l := edgepg.NewListener(u.String(), c, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	testenv.Must(t, l.Start(ctx), "start the listener")
	time.Sleep(time.Second) // a few quiet heartbeats pass on a live connection
	if !c.trusted.Load() || !l.Connected() {
		t.Fatal("a quiet, live connection was given up")
	}
	f.frozen.Store(true)
	frozenAt := time.Now()
	// Two heartbeats (0.8 s) plus scheduling on a busy machine; without the
	// heartbeat it is TCP's keepalive, minutes.
	testenv.Wait(t, 3*time.Second, "the cache no longer trusted", func() bool { return !c.trusted.Load() })
	t.Logf("the silent connection was noticed after %s", time.Since(frozenAt).Round(time.Millisecond))
}
