package fasthttp

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	fh "github.com/valyala/fasthttp"
)

func TestStripHopByHop(t *testing.T) {
	cases := []struct {
		name       string
		add        [][2]string // header lines, in order
		kept, gone []string
	}{
		{"headers without hop-by-hop ones are left whole", [][2]string{{"X-Custom", "1"}, {"Accept", "*/*"}},
			[]string{"X-Custom", "Accept"}, nil},
		{"hop-by-hop headers are dropped", [][2]string{{"Keep-Alive", "timeout=5"}, {"Te", "trailers"}, {"Upgrade", "websocket"},
			{"Proxy-Authorization", "Basic x"}, {"X-Custom", "1"}}, []string{"X-Custom"}, []string{"Keep-Alive", "Te", "Upgrade", "Proxy-Authorization"}},
		{"headers the Connection header names are dropped", [][2]string{{"Connection", "X-Secret, keep-alive"}, {"X-Secret", "s"}, {"X-Custom", "1"}},
			[]string{"X-Custom"}, []string{"X-Secret"}},
		{"so are those a second Connection line names", [][2]string{{"Connection", "keep-alive"}, {"Connection", "X-Secret"}, {"X-Secret", "s"},
			{"X-Other", "o"}, {"Connection", "X-Other"}, {"X-Custom", "1"}}, []string{"X-Custom"}, []string{"X-Secret", "X-Other"}},
	}
	check := func(t *testing.T, h headers, kept, gone []string) {
		t.Helper()
		for _, k := range kept {
			if len(h.PeekAll(k)) == 0 {
				t.Errorf("%s was dropped", k)
			}
		}
		for _, k := range gone {
			if len(h.PeekAll(k)) != 0 {
				t.Errorf("%s was kept", k)
			}
		}
	}
	for _, c := range cases {
		// Parsed from the wire, as the edge gets them: fasthttp keeps every
		// Connection line it reads (setting one keeps only the last).
		var lines strings.Builder
		for _, kv := range c.add {
			lines.WriteString(kv[0] + ": " + kv[1] + "\r\n")
		}
		t.Run("request: "+c.name, func(t *testing.T) {
			var r fh.Request
			raw := "GET / HTTP/1.1\r\nHost: x\r\n" + lines.String() + "\r\n"
			if err := r.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
				t.Fatal(err)
			}
			stripRequestHopByHop(&r.Header)
			check(t, &r.Header, c.kept, c.gone)
		})
		t.Run("response: "+c.name, func(t *testing.T) {
			var r fh.Response
			raw := "HTTP/1.1 200 OK\r\n" + lines.String() + "Content-Length: 0\r\n\r\n"
			if err := r.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
				t.Fatal(err)
			}
			stripResponseHopByHop(&r.Header)
			check(t, &r.Header, c.kept, c.gone)
		})
	}
}

func TestOnlyTheEdgesOwnRoutesTakeTheSlowPath(t *testing.T) {
	cases := []struct {
		method, path string
		slow         bool
	}{
		{"GET", "/healthz", true},
		{"GET", "/readyz", true},
		{"POST", "/v1/events", true},
		{"GET", "/v1/events", false},
		{"POST", "/healthz", false},
		{"GET", "/v1/widgets/1", false},
		{"GET", "/healthz/x", false},
	}
	for _, c := range cases {
		if got := slowPath([]byte(c.method), []byte(c.path)); got != c.slow {
			t.Errorf("%s %s: slow path %v, want %v", c.method, c.path, got, c.slow)
		}
	}
}

func TestMethodKeepsEveryMethodAsSent(t *testing.T) {
	for _, m := range []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "get", ""} {
		if got := method([]byte(m)); got != m {
			t.Errorf("method(%q) = %q", m, got)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = method([]byte{'G', 'E', 'T'}) }); n != 0 {
		t.Errorf("method of GET allocates %.0f times", n)
	}
}

func TestWhatFasthttpLogsLosesEveryCredential(t *testing.T) {
	for _, c := range []struct{ name, in, gone string }{
		{"a key in quoted contents", `contents: "GET / HTTP/1.1\r\nX: sk_live_4MYt4aLiFynmqxaZqGtMdi0ZK9nB\r\n"`, "4MYt4aLiFynmqxaZqGtMdi0ZK9nB"},
		{"a key outside quotes", `?k=pk_test_4MYt4aLiFynmqxaZqGtMdi0ZK9nB`, "4MYt4aLiFynmqxaZqGtMdi0ZK9nB"},
		{"a key after a word character", `token_sk_live_4MYt4aLiFynmqxaZqGtMdi0ZK9nB`, "4MYt4aLiFynmqxaZqGtMdi0ZK9nB"},
		{"an Authorization line without a colon", `malformed mime header: missing colon: "Authorization Bearer whatever-token"`, "whatever-token"},
		{"a Basic value fasthttp quotes without its name", `invalid header value "Basic c2tfbGl2ZV80TVl0NGFMaUZ5bm1xeGFaOg==\x01"`, "c2tfbGl2ZV80TVl0NGFMaUZ5bm1xeGFaOg=="},
		{"a value with escaped characters", `missing colon: "Authorization Basic\t\"c2tfbGl2ZV80TVl0\" more"`, "c2tfbGl2ZV80TVl0"},
		{"a Cookie value", `contents: "Cookie: session=abc123\r\n"`, "abc123"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := redactSecrets(c.in); strings.Contains(got, c.gone) {
				t.Fatalf("redactSecrets(%q) = %q, still has %q", c.in, got, c.gone)
			}
		})
	}
	t.Run("addresses and the message itself are kept", func(t *testing.T) {
		in := `error when serving connection "127.0.0.1:8080"<->"[::1]:51234": error when reading request headers: malformed mime header: missing colon: "x": buffer size=117`
		want := `error when serving connection "127.0.0.1:8080"<->"[::1]:51234": error when reading request headers: malformed mime header: missing colon: "[redacted]": buffer size=117`
		if got := redactSecrets(in); got != want {
			t.Fatalf("redactSecrets(%q)\n = %q\nwant %q", in, got, want)
		}
	})
}

// readGrowing reads exactly n bytes, in a buffer never larger than n,
// whatever the reads' sizes, and says when the body ends early.
func TestReadGrowingReadsExactlyTheBody(t *testing.T) {
	for _, n := range []int{0, 1, 16 << 10, 16<<10 + 1, 32 << 10, 65536} {
		src := bytes.Repeat([]byte("ab"), n/2+1)[:n]
		got, err := readGrowing(iotest.OneByteReader(bytes.NewReader(src)), n)
		if err != nil || !bytes.Equal(got, src) || cap(got) > max(n, 16<<10) {
			t.Errorf("n=%d: %d bytes, cap %d, %v", n, len(got), cap(got), err)
		}
	}
	if _, err := readGrowing(strings.NewReader("short"), 10); err != io.ErrUnexpectedEOF {
		t.Errorf("a body ending early: %v, want io.ErrUnexpectedEOF", err)
	}
}
