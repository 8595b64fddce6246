package edge

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// IdleWatch calls onIdle once when Touch has not been called for idle, as
// long as it is not stopped: an upgraded connection's guard against a peer
// that vanished without closing (upgraded_idle_timeout), and the net/http
// handler's bound on an upstream's silence (upstream_timeout).
type IdleWatch struct {
	idle   time.Duration
	onIdle func()
	last   atomic.Int64 // UnixNano of the last Touch
	mu     sync.Mutex
	timer  *time.Timer
	done   bool
}

// NewIdleWatch starts watching, as if touched now.
func NewIdleWatch(idle time.Duration, onIdle func()) *IdleWatch {
	w := &IdleWatch{idle: idle, onIdle: onIdle}
	w.Touch()
	w.mu.Lock()
	w.timer = time.AfterFunc(idle, w.check)
	w.mu.Unlock()
	return w
}

// Touch marks activity.
func (w *IdleWatch) Touch() { w.last.Store(time.Now().UnixNano()) }

// Stop ends the watch; onIdle is not called after Stop returns.
func (w *IdleWatch) Stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
	if w.timer != nil {
		w.timer.Stop()
	}
}

// check runs when idle may have passed since the last Touch: it calls
// onIdle if it has, and otherwise looks again when it will have.
func (w *IdleWatch) check() {
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return
	}
	quiet := time.Since(time.Unix(0, w.last.Load()))
	if quiet < w.idle {
		w.timer.Reset(w.idle - quiet)
		w.mu.Unlock()
		return
	}
	w.done = true
	w.mu.Unlock()
	w.onIdle()
}

// tunnelConn is a caller's connection handed over for an upgraded call: it
// counts the bytes read from and written to the caller, which are the
// whole traffic of the tunnel, and touches its watch on each.
type tunnelConn struct {
	net.Conn
	watch         *IdleWatch
	read, written atomic.Int64
	// early is what the caller sent behind its handshake, read first.
	early []byte
}

func (c *tunnelConn) Read(p []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		c.read.Add(int64(n))
		c.watch.Touch()
		return n, nil
	}
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.read.Add(int64(n))
		c.watch.Touch()
	}
	return n, err
}

func (c *tunnelConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.written.Add(int64(n))
		c.watch.Touch()
	}
	return n, err
}

// CloseWrite half-closes the caller's connection when it can be, so net/http's
// proxy can pass an upstream's end of stream on and keep reading the caller.
func (c *tunnelConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// upgradeWriter is the response writer net/http's proxy gets for a call
// that asks to switch protocols: when the proxy takes the caller's
// connection, it gets it as a tunnelConn, closed after idle without
// traffic either way.
type upgradeWriter struct {
	http.ResponseWriter
	idle time.Duration
	// hold ends the tunnel when its key stops being usable
	// (Server.HoldKey); release forgets that once the tunnel ends.
	hold    func(end func()) (release func())
	release func()
	conn    *tunnelConn
	// switched is when the proxy took the connection: the handshake's end.
	switched time.Time
}

func (w *upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.switched = time.Now()
	w.conn = &tunnelConn{Conn: conn}
	if n := brw.Reader.Buffered(); n > 0 {
		// What the caller sent right behind its handshake is in brw's
		// buffer, and net/http's proxy reads only the connection: the
		// tunnel's first read returns it.
		early, _ := brw.Reader.Peek(n)
		w.conn.early = bytes.Clone(early)
		_, _ = brw.Reader.Discard(n)
	}
	w.conn.watch = NewIdleWatch(w.idle, func() { conn.Close() })
	if w.hold != nil {
		w.release = w.hold(func() { conn.Close() })
	}
	return w.conn, brw, nil
}

func (w *upgradeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// tunnelled is the bytes carried from and to the caller after the
// handshake; it stops the idle watch.
func (w *upgradeWriter) tunnelled() (fromCaller, toCaller int64) {
	if w.conn == nil {
		return 0, 0
	}
	if w.release != nil {
		w.release()
	}
	w.conn.watch.Stop()
	return w.conn.read.Load(), w.conn.written.Load()
}
