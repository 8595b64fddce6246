package deadline

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// countedConn counts the read deadlines that reach the connection.
type countedConn struct {
	net.Conn
	moves atomic.Int64
}

func (c *countedConn) SetReadDeadline(t time.Time) error {
	c.moves.Add(1)
	return c.Conn.SetReadDeadline(t)
}

// pipe is a loopback TCP connection: the caller's end, wrapped as the
// front wraps it, and the other end.
func pipe(t *testing.T) (*lazyConn, *countedConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	other, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	raw, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	counted := &countedConn{Conn: raw}
	c := &lazyConn{Conn: counted}
	t.Cleanup(func() { c.Close(); other.Close() })
	return c, counted, other
}

// TestLazyConnReadsEndAtTheDeadlineAskedFor: a read ends when the
// deadline last asked for comes, whether it came sooner or later than the
// one before, and a cleared deadline lets a read wait for its data.
func TestLazyConnReadsEndAtTheDeadlineAskedFor(t *testing.T) {
	buf := make([]byte, 16)
	readUntil := func(t *testing.T, c net.Conn) (time.Duration, error) {
		t.Helper()
		start := time.Now()
		_, err := c.Read(buf)
		return time.Since(start), err
	}

	t.Run("a sooner deadline ends the read", func(t *testing.T) {
		c, _, _ := pipe(t)
		_ = c.SetReadDeadline(time.Now().Add(time.Hour))
		_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		took, err := readUntil(t, c)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read: %v, want a deadline error", err)
		}
		if took > 30*time.Second {
			t.Fatalf("read took %s: the sooner deadline was not set", took)
		}
	})

	t.Run("a later deadline is not cut short by the earlier one", func(t *testing.T) {
		c, counted, _ := pipe(t)
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		later := time.Now().Add(400 * time.Millisecond)
		_ = c.SetReadDeadline(later)
		if got := counted.moves.Load(); got != 1 {
			t.Fatalf("%d deadline moves reached the connection, want 1: the later deadline should wait", got)
		}
		_, err := readUntil(t, c)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read: %v, want a deadline error", err)
		}
		if now := time.Now(); now.Before(later) {
			t.Fatalf("read ended %s before the deadline asked for", later.Sub(now))
		}
	})

	t.Run("a cleared deadline lets the read wait for its data", func(t *testing.T) {
		c, _, other := pipe(t)
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_ = c.SetReadDeadline(time.Time{})
		go func() {
			time.Sleep(300 * time.Millisecond)
			_, _ = other.Write([]byte("hello"))
		}()
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != "hello" {
			t.Fatalf("read %q, %v; want hello", buf[:n], err)
		}
	})
}

// TestLazyConnMovesTheDeadlineRarely plays fasthttp's deadlines for a
// kept-alive connection (idle wait, header, body: three per call) over
// many calls, and counts the moves that reach the connection: two for the
// first call (its idle deadline, then its sooner header deadline), and
// none after, while calls keep coming well before the header deadline.
func TestLazyConnMovesTheDeadlineRarely(t *testing.T) {
	c, counted, other := pipe(t)
	buf := make([]byte, 4)
	for i := range 1000 {
		now := time.Now()
		_ = c.SetReadDeadline(now.Add(120 * time.Second)) // idle
		if _, err := other.Write([]byte("call")); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		_ = c.SetReadDeadline(now.Add(10 * time.Second)) // the header
		_ = c.SetReadDeadline(now.Add(30 * time.Second)) // the body
	}
	if got := counted.moves.Load(); got > 2 {
		t.Fatalf("%d deadline moves reached the connection over 1,000 calls, want at most 2", got)
	}
}
