package edge_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// TestCORS checks, on both fronts, that pages on an allowed origin can call
// the API with a publishable key: the browser's preflight is answered at
// the edge without a key (and is neither metered nor audited as a failed
// authentication), every answer to the page, errors included, carries the
// CORS headers the page needs to read it, and the upstream's own CORS
// headers do not contradict the edge's. Other origins are refused at the
// preflight; with CORS off, a preflight is a call like any other.
func TestCORS(t *testing.T) {
	env := edgetest.New(t)
	pk, _ := env.Key(t, "acct_cors", edge.Publishable, schemas.Live)
	sk, _ := env.Key(t, "acct_cors", edge.Secret, schemas.Live)
	const page = "https://app.example.com"
	upstream := serveUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "echo" {
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer conn.Close()
			_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\nAccess-Control-Allow-Origin: *\r\n\r\n")
			_ = brw.Flush()
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", "*") // the upstream's own, which the edge replaces
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"ok":true}`)
	}))
	call := func(t *testing.T, method, url string, h map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, url, nil)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, method+" "+url)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) {
				c.Upstream = upstream
				c.CORS = edge.CORSConfig{AllowedOrigins: []string{page}}
			}})
			pre := call(t, "OPTIONS", in.URL+"/v1/things", map[string]string{"Origin": page,
				"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization, content-type"})
			if pre.StatusCode != 204 || pre.Header.Get("Access-Control-Allow-Origin") != page ||
				pre.Header.Get("Access-Control-Allow-Methods") != "GET" ||
				pre.Header.Get("Access-Control-Allow-Headers") != "authorization, content-type" ||
				pre.Header.Get("Access-Control-Max-Age") != "600" {
				t.Fatalf("preflight: status %d headers %v", pre.StatusCode, pre.Header)
			}

			got := call(t, "GET", in.URL+"/v1/things", map[string]string{"Origin": page, "Authorization": "Bearer " + pk})
			if got.StatusCode != 200 || len(got.Header.Values("Access-Control-Allow-Origin")) != 1 ||
				got.Header.Get("Access-Control-Allow-Origin") != page ||
				!strings.Contains(got.Header.Get("Access-Control-Expose-Headers"), "X-RateLimit-Remaining") ||
				!strings.Contains(got.Header.Get("Access-Control-Expose-Headers"), "Request-Id") {
				t.Fatalf("call: status %d headers %v", got.StatusCode, got.Header)
			}
			// The call is metered; the preflight before it is not.
			eventFor(t, env, got.Header.Get(edge.HeaderRequestID))
			for _, ev := range edgetest.ReadTopic(t, env.Brokers, env.Topic, 1, 0) {
				if ev.RequestID == pre.Header.Get(edge.HeaderRequestID) {
					t.Fatalf("the preflight was metered: %+v", ev)
				}
			}

			// A switch of protocols carries the edge's stand alone, as
			// every other answer does.
			conn, err := net.Dial("tcp", strings.TrimPrefix(in.URL, "http://"))
			testenv.Must(t, err, "dial the edge")
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = io.WriteString(conn, "GET /v1/socket HTTP/1.1\r\nHost: edge.test\r\nOrigin: "+page+"\r\nAuthorization: Bearer "+pk+
				"\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
			testenv.Must(t, err, "send the upgrade")
			sw, err := http.ReadResponse(bufio.NewReader(conn), nil)
			testenv.Must(t, err, "read the 101")
			conn.Close()
			if sw.StatusCode != 101 || fmt.Sprint(sw.Header.Values("Access-Control-Allow-Origin")) != "["+page+"]" {
				t.Fatalf("101: status %d, Access-Control-Allow-Origin %q; want the edge's alone", sw.StatusCode, sw.Header.Values("Access-Control-Allow-Origin"))
			}

			// An error is readable by the page too.
			denied := call(t, "GET", in.URL+"/v1/things", map[string]string{"Origin": page, "Authorization": "Bearer pk_live_nonsense"})
			if denied.StatusCode != 401 || denied.Header.Get("Access-Control-Allow-Origin") != page {
				t.Fatalf("refused call: status %d headers %v", denied.StatusCode, denied.Header)
			}

			// So is an events batch refused before the handler sees it.
			req, _ := http.NewRequest("POST", in.URL+"/v1/events", strings.NewReader(strings.Repeat(" ", edge.MaxBatchBytes+1)))
			req.Header.Set("Origin", page)
			req.Header.Set("Authorization", "Bearer "+sk)
			big, err := http.DefaultClient.Do(req)
			testenv.Must(t, err, "POST a batch over the limit")
			_, _ = io.Copy(io.Discard, big.Body)
			big.Body.Close()
			if big.StatusCode != 413 || big.Header.Get("Access-Control-Allow-Origin") != page {
				t.Fatalf("batch over the limit: status %d headers %v", big.StatusCode, big.Header)
			}

			other := call(t, "OPTIONS", in.URL+"/v1/things", map[string]string{"Origin": "https://evil.example",
				"Access-Control-Request-Method": "GET"})
			if other.StatusCode != 403 || other.Header.Get("Access-Control-Allow-Origin") != "" {
				t.Fatalf("preflight from another origin: status %d headers %v", other.StatusCode, other.Header)
			}
			plain := call(t, "GET", in.URL+"/v1/things", map[string]string{"Origin": "https://evil.example", "Authorization": "Bearer " + pk})
			if plain.StatusCode != 200 || plain.Header.Get("Access-Control-Allow-Origin") != "" {
				t.Fatalf("call from another origin: status %d, Access-Control-Allow-Origin %q; want the answer without it",
					plain.StatusCode, plain.Header.Get("Access-Control-Allow-Origin"))
			}
		})
		t.Run(fr.name+" with CORS off", func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP, Config: func(c *edge.Config) { c.Upstream = upstream }})
			pre := call(t, "OPTIONS", in.URL+"/v1/things", map[string]string{"Origin": page, "Access-Control-Request-Method": "GET"})
			if pre.StatusCode != 401 {
				t.Fatalf("preflight with CORS off: status %d, want 401 like any call without a key", pre.StatusCode)
			}
			got := call(t, "GET", in.URL+"/v1/things", map[string]string{"Origin": page, "Authorization": "Bearer " + pk})
			if got.StatusCode != 200 || got.Header.Get("Access-Control-Allow-Origin") != "*" {
				t.Fatalf("with CORS off the upstream's headers pass: status %d, Access-Control-Allow-Origin %q", got.StatusCode,
					got.Header.Get("Access-Control-Allow-Origin"))
			}
		})
	}
}
