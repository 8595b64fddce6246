package edge_test

import (
	"errors"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// An upstream that never completes the connection is silent like any
// other: the call gets 504 upstream_timeout once upstream_timeout has
// passed, not after the 5 s a connection may take at most. The fasthttp
// front waited the 5 s whatever upstream_timeout said. Both fronts, for a
// call and for an upgrade (which opens a connection of its own on the
// front).
func TestAnUpstreamThatNeverAcceptsIsATimeoutWithinUpstreamTimeout(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_dial", edge.Secret, schemas.Live)
	up := unaccepting(t)
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				c.Upstream, c.SandboxUpstream, c.UpstreamTimeout = up, "", 400*time.Millisecond
			}})
			start := time.Now()
			r := edgetest.Do(t, "GET", in.URL+"/v1/widgets/1", key, nil)
			took := time.Since(start)
			if r.Status != 504 || r.Error.Code != "upstream_timeout" {
				t.Fatalf("a call to an upstream that never accepts: %d %q (%s); want 504 upstream_timeout", r.Status, r.Error.Code, r.Body)
			}
			// The bound under test, not a speed: 5 s would be the old one.
			if took > 3*time.Second {
				t.Fatalf("answered after %v; upstream_timeout is 400ms", took)
			}
			if ev := eventFor(t, env, r.Header.Get(edge.HeaderRequestID)); ev.Status != 504 {
				t.Fatalf("event status %d, want 504", ev.Status)
			}

			start = time.Now()
			_, _, resp := openEcho(t, in, key, "")
			took = time.Since(start)
			answeredAndMetered(t, env, resp, 504, "upstream_timeout")
			if took > 3*time.Second {
				t.Fatalf("the upgrade was answered after %v; upstream_timeout is 400ms", took)
			}
		})
	}
}

// unaccepting returns the URL of a loopback port whose listener takes no
// more connections: its accept queue (backlog 0, so one connection) is
// full and never drained, and Linux drops further SYNs, so a connect
// hangs until its caller gives up.
func unaccepting(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	testenv.Must(t, err, "socket")
	t.Cleanup(func() { syscall.Close(fd) })
	testenv.Must(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}), "bind")
	testenv.Must(t, syscall.Listen(fd, 0), "listen")
	sa, err := syscall.Getsockname(fd)
	testenv.Must(t, err, "getsockname")
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	// Fill the queue: connections complete until it is full, then one
	// hangs. That one proves the port takes no more.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			break
		}
		testenv.Must(t, err, "fill the accept queue of "+addr)
		t.Cleanup(func() { c.Close() })
		if i == 16 {
			t.Fatalf("%s took 17 connections with backlog 0; cannot make an upstream that never accepts", addr)
		}
	}
	return "http://" + addr
}
