package testenv

import (
	"io"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
)

// Freezer forwards loopback connections to a service until frozen, then
// drops every byte both ways without closing anything: a peer that
// vanished (a failover, a dead host, a partition), which neither closes
// nor resets its connections.
type Freezer struct {
	ln     net.Listener
	frozen atomic.Bool
}

// NewFreezer listens on a loopback port of its own and forwards what
// arrives there to addr. It stops with the test.
func NewFreezer(t testing.TB, addr string) *Freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	Must(t, err, "listen")
	f := &Freezer{ln: ln}
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

// Addr is the host:port to connect to instead of the service's.
func (f *Freezer) Addr() string { return f.ln.Addr().String() }

// Freeze drops every byte from now on.
func (f *Freezer) Freeze() { f.frozen.Store(true) }

func (f *Freezer) pipe(dst io.Writer, src io.Reader) {
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

// Freezable is a URL of pg reached through a Freezer of its own, which the
// test can freeze to make the database go silent (no close, no reset).
func (pg *Postgres) Freezable(t testing.TB) (*Freezer, string) {
	t.Helper()
	u, err := url.Parse(pg.URL)
	Must(t, err, "parse the database URL")
	f := NewFreezer(t, u.Host)
	u.Host = f.Addr()
	return f, u.String()
}
