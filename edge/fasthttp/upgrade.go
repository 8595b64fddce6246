package fasthttp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	fh "github.com/valyala/fasthttp"

	"github.com/tollgate-dev/tollgate/edge"
)

// isUpgrade reports whether a call asks to switch protocols (RFC 9110,
// 7.8): it names a protocol in Upgrade and "upgrade" among Connection's
// options.
func isUpgrade(h *fh.RequestHeader) bool {
	if len(h.Peek(fh.HeaderUpgrade)) == 0 {
		return false
	}
	for _, opt := range strings.Split(string(h.Peek(fh.HeaderConnection)), ",") {
		if strings.EqualFold(strings.TrimSpace(opt), "upgrade") {
			return true
		}
	}
	return false
}

// upgrade proxies a call that switches protocols, a WebSocket handshake
// say. The handshake goes to the upstream on a connection of its own, not
// one of the pool's. When the upstream switches, the caller's connection is
// taken from fasthttp and the two are joined until either side closes; the
// call is metered then, with status 101 and the bytes carried each way
// after the handshake. An upstream that declines answers the caller as any
// call would be answered.
// Admit took the upgraded connection (adm.UpgradeClosed) before the limits.
func (f *Front) upgrade(ctx *fh.RequestCtx, adm edge.Admission, call edge.Call, start time.Time) {
	closed := adm.UpgradeClosed
	tunnelled := false
	defer func() {
		if !tunnelled {
			closed()
		}
	}()
	call.Start = start
	protocol := string(ctx.Request.Header.Peek(fh.HeaderUpgrade))
	up, _ := f.forward(ctx, adm, call.RequestID) // drops Upgrade and Connection with the hop-by-hop headers
	req := &ctx.Request
	req.Header.Set(fh.HeaderConnection, "Upgrade")
	req.Header.Set(fh.HeaderUpgrade, protocol)
	answer := func(ae *edge.APIError) { // a forwarded call the edge answers itself, metered
		f.fail(ctx, ae, call.RequestID)
		call.Status = ae.Status
		f.s.EmitCall(call)
		f.s.Observe(adm.Route, true, ae.Status, f.s.Now().Sub(start))
	}
	fail := func(err error) {
		ae := upstreamError(err)
		f.log.Warn("upstream error on a connection upgrade", "status", ae.Status, "err", err)
		answer(ae)
	}
	conn, err := up.dial(f.timeout)
	if err != nil {
		fail(err)
		return
	}
	_ = conn.SetDeadline(time.Now().Add(f.timeout))
	// The head is written as it stands, so its request-target is put in
	// origin form from the parsed URI first, as the client does for an
	// ordinary call: one asked in absolute form would carry its URI's
	// credentials (which forward cleared only in the parsed URI) on.
	u := req.URI()
	u.DisablePathNormalizing = true
	req.Header.SetRequestURIBytes(u.RequestURI())
	if _, err := conn.Write(req.Header.Header()); err != nil {
		conn.Close()
		fail(err)
		return
	}
	if n := req.Header.ContentLength(); n > 0 {
		body := ctx.RequestBodyStream()
		if body == nil {
			body = bytes.NewReader(req.Body())
		}
		sent, err := io.CopyN(conn, body, int64(n))
		call.RequestBytes = sent
		if err != nil {
			conn.Close()
			fail(err)
			return
		}
	}
	br := bufio.NewReaderSize(conn, maxHeaderBytes)
	resp, err := http.ReadResponse(br, nil)
	// Informational answers before the switch (103 Early Hints, say) are
	// not the answer: the next one is.
	for err == nil && resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
		resp, err = http.ReadResponse(br, nil)
	}
	if err != nil {
		conn.Close()
		fail(err)
		return
	}
	call.Status = resp.StatusCode
	if resp.StatusCode == http.StatusSwitchingProtocols && (len(resp.Header.Values("Upgrade")) != 1 || !edge.UpgradeAsked(protocol, resp.Header.Get("Upgrade"))) {
		// A switch to another protocol than the caller asked for (and
		// upgrade_protocols let through) is not joined, as net/http's
		// ReverseProxy refuses it too.
		resp.Body.Close()
		conn.Close()
		call.Status = 0
		fail(fmt.Errorf("the upstream switched to %q when %q was asked for", resp.Header.Get("Upgrade"), protocol))
		return
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		f.declined(ctx, adm, call.RequestID, conn, resp, func(sent int64) {
			call.ResponseBytes = sent
			f.s.EmitCall(call)
			f.s.Observe(adm.Route, true, call.Status, f.s.Now().Sub(start))
		})
		return
	}
	_ = conn.SetDeadline(time.Time{})

	// The caller's 101: the edge's own headers (Request-Id, the rate
	// limits) and the upstream's, Connection and Upgrade included.
	var head bytes.Buffer
	head.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	for k, v := range ctx.Response.Header.All() {
		switch string(k) {
		case fh.HeaderContentType, fh.HeaderContentLength, fh.HeaderConnection, fh.HeaderDate, fh.HeaderServer:
			continue
		}
		writeHeader(&head, string(k), string(v))
	}
	// Of the upstream's hop-by-hop headers, only the switch itself
	// (Connection: Upgrade and Upgrade) is the caller's too; Connection:
	// Upgrade is written whether the upstream sent it or not, as a
	// WebSocket client requires it.
	named := edge.ConnectionNamed(resp.Header)
	writeHeader(&head, fh.HeaderConnection, "Upgrade")
	for k, vs := range resp.Header {
		if f.cors != nil && edge.IsCORSHeader(k) || edge.IsEdgeHeader(k) {
			continue // the edge's own stand, written above
		}
		switch {
		case k == fh.HeaderConnection:
			continue
		case k == fh.HeaderUpgrade:
		case isHopByHop([]byte(k)) || named[k]:
			continue
		}
		for _, v := range vs {
			writeHeader(&head, k, v)
		}
	}
	head.WriteString("\r\n")

	t := f.tunnels.add(conn, f.idle)
	if t == nil {
		// The front is stopping: no new tunnel may outlive it. Not an
		// upstream failure, so not answered as one.
		conn.Close()
		ctx.SetConnectionClose()
		answer(errShuttingDown())
		return
	}
	tunnelled = true
	// A revoked or expired key ends the tunnel: the key was checked only
	// at the handshake.
	release := f.s.HoldKey(adm.Key, adm.KeyEpoch, t.close)
	// The latency histogram gets the handshake's time: a tunnel's lifetime
	// (minutes, hours) would swamp the route's percentiles. The event's
	// latency is the lifetime.
	f.s.Observe(adm.Route, true, call.Status, f.s.Now().Sub(start))
	// The call ends once, metered and its slot given back, whether the
	// hijack runs or not: fasthttp skips the hijack handler when it cannot
	// first flush an earlier pipelined answer to a caller that has gone.
	// Then the tunnel is abandoned, by a watchdog after upstream_timeout
	// or at once when the front stops.
	var state atomic.Int32 // 0 waiting for the hijack, 1 joined, 2 abandoned
	finish := func(fromCaller, toCaller int64) {
		release()
		call.RequestBytes += fromCaller
		call.ResponseBytes = toCaller
		f.s.EmitCall(call)
		closed()
		f.tunnels.done(t)
	}
	abandon := func() {
		if state.CompareAndSwap(0, 2) {
			t.close()
			finish(0, 0)
		}
	}
	t.setAbandon(abandon)
	watchdog := time.AfterFunc(max(f.timeout, time.Second), abandon)
	ctx.HijackSetNoResponse(true)
	ctx.Hijack(func(caller net.Conn) {
		if !state.CompareAndSwap(0, 1) {
			caller.Close()
			return
		}
		watchdog.Stop()
		finish(t.join(caller, head.Bytes(), br))
	})
}

// declined answers an upgrade the upstream did not switch to with the
// upstream's answer, body streamed, and closes the upstream connection when
// the body is done.
func (f *Front) declined(ctx *fh.RequestCtx, adm edge.Admission, rid string, conn net.Conn, resp *http.Response, done func(sent int64)) {
	ctx.SetStatusCode(resp.StatusCode)
	named := edge.ConnectionNamed(resp.Header)
	for k, vs := range resp.Header {
		if isHopByHop([]byte(k)) || named[k] || f.cors != nil && edge.IsCORSHeader(k) || edge.IsEdgeHeader(k) {
			continue
		}
		switch k {
		case fh.HeaderContentLength, fh.HeaderTransferEncoding, fh.HeaderDate, fh.HeaderConnection:
			continue
		}
		for _, v := range vs {
			ctx.Response.Header.Add(k, v)
		}
	}
	if ctx.IsHead() {
		ctx.Response.SkipBody = true
		resp.Body.Close()
		conn.Close()
		done(0)
		return
	}
	size := int(resp.ContentLength)
	if resp.ContentLength < 0 {
		size = -1
	}
	// The handshake's deadline bounded the whole exchange; the answer's
	// body is bounded per silence instead, as a proxied call's is: a
	// stream that keeps sending was cut at upstream_timeout.
	_ = conn.SetDeadline(time.Time{})
	timeout := f.timeout
	r := readerFunc(func(p []byte) (int, error) {
		_ = conn.SetReadDeadline(time.Now().Add(timeout))
		return resp.Body.Read(p)
	})
	body := &responseBody{r: r, closers: []io.Closer{resp.Body, conn}, done: finishFunc(done)}
	f.holdLongAnswer(ctx, adm, rid, body, resp.ContentLength)
	ctx.Response.SetBodyStream(body, size)
}

func writeHeader(b *bytes.Buffer, k, v string) {
	b.WriteString(k)
	b.WriteString(": ")
	b.WriteString(v)
	b.WriteString("\r\n")
}

// dial opens a connection of its own to the upstream, with TLS when the
// upstream is https.
func (u *upstream) dial(timeout time.Duration) (net.Conn, error) {
	conn, err := fh.DialTimeout(u.hc.Addr, u.dialTimeout)
	if err != nil {
		return nil, err
	}
	if !u.hc.IsTLS {
		return conn, nil
	}
	tc := tls.Client(conn, u.tls)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return tc, nil
}

// tunnel is one upgraded call: the caller's connection joined to the
// upstream's.
type tunnel struct {
	upstream net.Conn
	idle     time.Duration
	mu       sync.Mutex
	caller   net.Conn
	closed   bool
	watch    *edge.IdleWatch
	// abandon, when set, ends a call whose hijack has not started; close
	// calls it (a stopping front cuts every tunnel).
	abandon func()
}

func (t *tunnel) setAbandon(f func()) {
	t.mu.Lock()
	t.abandon = f
	t.mu.Unlock()
}

// join writes head to the caller, then carries bytes both ways (first
// those the upstream sent behind its answer, which br holds) until either
// side closes, the tunnel is cut, or nothing crosses it for t.idle, and
// closes both. It returns the bytes carried from and to the caller, head
// not counted.
func (t *tunnel) join(caller net.Conn, head []byte, br *bufio.Reader) (fromCaller, toCaller int64) {
	t.mu.Lock()
	t.caller = caller
	closed := t.closed
	if !closed {
		t.watch = edge.NewIdleWatch(t.idle, t.close)
	}
	t.mu.Unlock()
	if closed {
		caller.Close()
		return 0, 0
	}
	if _, err := caller.Write(head); err != nil {
		t.close()
		return 0, 0
	}
	up := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(t.upstream, activity{caller, t.watch})
		t.close() // the caller is gone: so is the call
		up <- n
	}()
	toCaller, _ = io.Copy(caller, activity{br, t.watch})
	t.close()
	return <-up, toCaller
}

func (t *tunnel) close() {
	t.mu.Lock()
	t.closed = true
	if t.watch != nil {
		t.watch.Stop()
	}
	t.upstream.Close()
	if t.caller != nil {
		t.caller.Close()
	}
	abandon := t.abandon
	t.mu.Unlock()
	if abandon != nil {
		abandon() // a no-op once the hijack has started
	}
}

// activity is a reader that marks its tunnel active whenever bytes come.
type activity struct {
	r     io.Reader
	watch *edge.IdleWatch
}

func (a activity) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.watch.Touch()
	}
	return n, err
}

// tunnels are the upgraded calls in progress, so that a stop can cut them.
type tunnels struct {
	mu      sync.Mutex
	open    map[*tunnel]struct{}
	wg      sync.WaitGroup
	stopped bool
}

// add registers a tunnel over upstream, cut after idle without traffic;
// nil once the front is stopping.
func (ts *tunnels) add(upstream net.Conn, idle time.Duration) *tunnel {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.stopped {
		return nil
	}
	if ts.open == nil {
		ts.open = map[*tunnel]struct{}{}
	}
	t := &tunnel{upstream: upstream, idle: idle}
	ts.open[t] = struct{}{}
	ts.wg.Add(1)
	return t
}

func (ts *tunnels) done(t *tunnel) {
	ts.mu.Lock()
	delete(ts.open, t)
	ts.mu.Unlock()
	ts.wg.Done()
}

// closeAll cuts every tunnel and waits, until ctx ends, for each to be
// metered.
func (ts *tunnels) closeAll(ctx context.Context) error {
	// The tunnels are closed outside the lock: closing one whose hijack
	// never started abandons it, and that ends the call, which takes the
	// lock to forget the tunnel.
	ts.mu.Lock()
	ts.stopped = true
	open := make([]*tunnel, 0, len(ts.open))
	for t := range ts.open {
		open = append(open, t)
	}
	ts.mu.Unlock()
	for _, t := range open {
		t.close()
	}
	waited := make(chan struct{})
	go func() {
		ts.wg.Wait()
		close(waited)
	}()
	select {
	case <-waited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
