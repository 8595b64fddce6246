package edge_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// rawCall opens a connection to the edge at base (http://host:port) and
// sends head, the request's head without its blank line, then the first
// part of a body.
func rawCall(t *testing.T, base, head string, first []byte) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	testenv.Must(t, err, "dial the edge")
	t.Cleanup(func() { conn.Close() })
	_, err = io.WriteString(conn, strings.ReplaceAll(head, "\n", "\r\n")+"\r\n\r\n")
	testenv.Must(t, err, "send the head")
	if len(first) > 0 {
		_, err = conn.Write(first)
		testenv.Must(t, err, "send the body's first part")
	}
	return conn
}

// A short body (up to 64 KiB, with a length) is read whole before an
// upstream connection is taken: a caller trickling one holds none, so the
// other callers are served meanwhile. Streamed, a few hundred such calls,
// with any key, left every other caller 503 upstream_busy.
func TestATrickledShortUploadHoldsNoUpstreamConnection(t *testing.T) {
	env := edgetest.New(t)
	slow, _ := env.Key(t, "acct_trickle", edge.Secret, schemas.Live)
	other, _ := env.Key(t, "acct_other", edge.Secret, schemas.Live)
	up := streamingUpstream(t, nil)
	in := env.Start(t, edgetest.Options{Config: func(c *edge.Config) {
		c.Upstream, c.UpstreamMaxConns, c.UpstreamTimeout = up, 1, 2*time.Second
	}})
	const size = 20000 // past the 8 KiB fasthttp reads before the handler runs
	body := []byte(strings.Repeat("x", size))
	conn := rawCall(t, in.URL, fmt.Sprintf("POST /v1/upload HTTP/1.1\nHost: edge\nAuthorization: Bearer %s\nContent-Length: %d", slow, size), body[:9000])
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the rest, a byte at a time, over about 2.5 s
		defer wg.Done()
		for i := 9000; i < size; {
			n := min(size-i, (size-9000)/25+1)
			if _, err := conn.Write(body[i : i+n]); err != nil {
				return
			}
			i += n
			time.Sleep(100 * time.Millisecond)
		}
	}()
	time.Sleep(300 * time.Millisecond) // the trickled call admitted and waiting on its body
	for i := range 3 {
		if r := edgetest.Do(t, "GET", in.URL+"/v1/upload", other, nil); r.Status != http.StatusOK {
			t.Fatalf("call %d of another account during the trickle: %d %s, want 200", i, r.Status, r.Error.Code)
		}
	}
	wg.Wait()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	testenv.Must(t, err, "read the trickled call's answer")
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), fmt.Sprintf(`"bytes":%d`, size)) {
		t.Fatalf("the trickled call: %d %s, want 200 with its %d bytes passed on", resp.StatusCode, b, size)
	}
}

// Test-mode calls have an upstream pool of their own even without a
// sandbox upstream: a test key (a publishable one is public) keeping every
// connection of its pool busy leaves live calls served.
func TestTestCallsCannotTakeLiveCallsConnections(t *testing.T) {
	env := edgetest.New(t)
	testKey, _ := env.Key(t, "acct_sandboxed", edge.Publishable, schemas.Test)
	live, _ := env.Key(t, "acct_live_pool", edge.Secret, schemas.Live)
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			release := make(chan struct{})
			var once sync.Once
			free := func() { once.Do(func() { close(release) }) }
			var busy atomic.Int64
			up := busyUpstream(t, &busy, &release)
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				// No sandbox upstream: test calls go to the live one.
				c.Upstream, c.SandboxUpstream, c.UpstreamMaxConns, c.UpstreamTimeout = up, "", 1, 500*time.Millisecond
			}})
			t.Cleanup(free) // before the edge stops: no call left streaming for it to wait on
			go func() {
				req, _ := http.NewRequest("GET", in.URL+"/v1/busy", nil)
				req.Header.Set("Authorization", "Bearer "+testKey)
				if resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req); err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
			testenv.Wait(t, 10*time.Second, "the test key's call at the upstream", func() bool { return busy.Load() == 1 })
			if r := edgetest.Do(t, "GET", in.URL+"/v1/widgets/1", live, nil); r.Status != 200 || string(r.Body) != "quick" {
				t.Fatalf("a live call while a test call holds its pool's one connection: %d %s, want 200", r.Status, r.Error.Code)
			}
			if r := edgetest.Do(t, "GET", in.URL+"/v1/widgets/1", testKey, nil); r.Status != 503 || r.Error.Code != "upstream_busy" {
				t.Fatalf("a second test call: %d %q, want 503 upstream_busy (its own pool is full)", r.Status, r.Error.Code)
			}
		})
	}
}

// A health check's body is never read: the answer comes at once and the
// connection closes. It was read into memory first, up to 8 MiB a call,
// with no key asked.
func TestAHealthCheckDoesNotReadItsBody(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	for _, path := range []string{"/healthz", "/readyz"} {
		conn := rawCall(t, in.URL, fmt.Sprintf("GET %s HTTP/1.1\nHost: edge\nContent-Length: 8388608", path), []byte(strings.Repeat("x", 10000)))
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s with an 8 MiB body still coming: %v, want an answer at once", path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || !resp.Close {
			t.Fatalf("%s with a body: %d, close %v; want 200 and the connection closed", path, resp.StatusCode, resp.Close)
		}
	}
}

// A caller that hangs up before its body's declared end broke off its own
// call: it is metered 400 (the caller's), not 502 (the upstream's), whether
// its body was short enough to be read whole or streamed.
func TestACallerHangingUpMidUploadIsMeteredAsItsOwnFailure(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_hangup", edge.Secret, schemas.Live)
	in := env.Start(t, edgetest.Options{Config: func(c *edge.Config) { c.Upstream = streamingUpstream(t, nil) }})
	for _, size := range []int{30000, 200000} { // read whole; streamed
		conn := rawCall(t, in.URL, fmt.Sprintf("POST /v1/upload HTTP/1.1\nHost: edge\nAuthorization: Bearer %s\nContent-Length: %d", key, size),
			[]byte(strings.Repeat("x", 20000)))
		time.Sleep(300 * time.Millisecond)
		conn.Close()
	}
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 2, 20*time.Second)
	for _, e := range evs {
		if e.Status != 400 {
			t.Errorf("a call whose caller hung up mid-body (%d bytes sent) metered %d, want 400", e.RequestBytes, e.Status)
		}
	}
}

// A body sent without a Content-Type reaches the upstream without one:
// fasthttp's client added application/octet-stream.
func TestABodyWithoutAContentTypeGetsNone(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_ctype", edge.Secret, schemas.Live)
	up := serveUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "%q", r.Header.Values("Content-Type"))
	}))
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) { c.Upstream = up }})
			conn := rawCall(t, in.URL, fmt.Sprintf("POST /v1/widgets HTTP/1.1\nHost: edge\nAuthorization: Bearer %s\nContent-Length: 5", key), []byte("hello"))
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			testenv.Must(t, err, "read the answer")
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 || string(b) != "[]" {
				t.Fatalf("the upstream saw Content-Type %s (status %d), want none", b, resp.StatusCode)
			}
		})
	}
}

// A short body's buffer grows as its bytes come: a caller that sends the
// head of a 64 KiB upload and stalls holds no 64 KiB buffer. Made at the
// declared length, 400 such calls held 96 KiB each; a streamed call holds
// at most about 48.
func TestAStalledShortUploadHoldsOnlyWhatItSent(t *testing.T) {
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_stall", edge.Secret, schemas.Live)
	in := env.Start(t, edgetest.Options{Config: func(c *edge.Config) { c.Upstream, c.UpstreamTimeout = streamingUpstream(t, nil), 30*time.Second }})
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	const calls = 300
	before := heap()
	for range calls {
		rawCall(t, in.URL, fmt.Sprintf("POST /v1/upload HTTP/1.1\nHost: edge\nAuthorization: Bearer %s\nContent-Length: %d", key, 64<<10),
			[]byte(strings.Repeat("x", 8193)))
	}
	time.Sleep(2 * time.Second) // every call admitted and reading its body
	per := (int64(heap()) - int64(before)) / calls
	t.Logf("%d stalled calls hold %.1f KiB each", calls, float64(per)/1024)
	if per > 64<<10 {
		t.Fatalf("a stalled 64 KiB upload holds %.1f KiB, want its buffer to hold only what came", float64(per)/1024)
	}
}
