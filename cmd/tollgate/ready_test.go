package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// A Postgres that goes silent (a failover, a dead host: no close, no
// reset) makes the edge's /readyz answer 503 within about a second, and
// the edge still stops promptly after probes. The ping waited on the
// silent connection for as long as the prober did, and left the pool's own
// ping holding the connection for a minute, which held up Close.
func TestAnEdgesReadinessAnswersWhenPostgresGoesSilent(t *testing.T) {
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	f, silent := pg.Freezable(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	t.Cleanup(up.Close)
	cfg := testConfig(t, pg, ch, "ready."+testenv.Name(t))
	cfg.Services.PostgresURL = silent
	cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), up.URL
	m, err := NewEdgeMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "start the edge")
	stop := runComponent(t, m)
	probe := func() (int, error) {
		c := &http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get("http://" + m.Addr() + "/readyz")
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	testenv.Wait(t, 10*time.Second, "the edge ready", func() bool { st, err := probe(); return err == nil && st == 200 })
	key, _ := (&pipeline{pg: pg}).newKey(t, "acct_silent_pg", schemas.Live)

	f.Freeze()
	for i := range 3 {
		began := time.Now()
		st, err := probe()
		if err != nil || st != http.StatusServiceUnavailable {
			t.Fatalf("probe %d with Postgres silent: status %d, %v after %s; want 503 at once", i, st, err, time.Since(began).Round(time.Millisecond))
		}
	}
	// A call whose key must be looked up is refused, not held until TCP
	// gives up (edge.key_lookup_timeout, 5 s by default), and a malformed key's failure
	// waits in the audit writer, whose flushes the database never
	// answers: the stop below must not wait on them.
	time.Sleep(1500 * time.Millisecond) // the listener has noticed: the cache is off
	c := &http.Client{Timeout: 15 * time.Second}
	for _, k := range []string{key, "sk_live_malformed"} {
		req, _ := http.NewRequest("GET", "http://"+m.Addr()+"/v1/things", nil)
		req.Header.Set("Authorization", "Bearer "+k)
		began := time.Now()
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("a call with Postgres silent: %v after %s; want an answer", err, time.Since(began).Round(time.Millisecond))
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := map[bool]int{true: 503, false: 401}[k == key]; resp.StatusCode != want {
			t.Fatalf("a call with Postgres silent: %d %s; want %d", resp.StatusCode, body, want)
		}
		if k == key && resp.Header.Get("Retry-After") != "1" {
			t.Fatalf("503 key_store_unavailable with Retry-After %q, want 1", resp.Header.Get("Retry-After"))
		}
		t.Logf("answered %d after %s", resp.StatusCode, time.Since(began).Round(time.Millisecond))
	}
	stop()
	closed := make(chan error, 1)
	stopped := time.Now()
	go func() { closed <- m.Close() }()
	select {
	case <-closed:
		t.Logf("closed after %s", time.Since(stopped).Round(time.Millisecond))
	case <-time.After(25 * time.Second):
		// The audit writer tries its row for 10 s, the spool hold's last
		// sync for 2 s; the process gives its stop 30 s in all. Before,
		// the audit writer's flush held Close until TCP gave up.
		t.Fatal("the edge's Close did not return within 25 s of its stop")
	}
}

// The first SIGTERM or SIGINT stops a process gracefully, with deadlines; a
// second one ends it at once. It was caught and ignored, so an operator's
// second Ctrl-C did nothing while a stop waited (here the edge waits up
// to 15 s for a call whose upload stalled).
func TestASecondSignalEndsTheProcessAtOnce(t *testing.T) {
	pg := testenv.NewPostgres(t)
	bin := tollgateBinary(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	t.Cleanup(up.Close)
	p := &pipeline{pg: pg}
	key, _ := p.newKey(t, "acct_signals", schemas.Live)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "find a free port")
	addr := ln.Addr().String()
	ln.Close()
	cfgPath := t.TempDir() + "/tollgate.yaml"
	testenv.Must(t, os.WriteFile(cfgPath, []byte("# every default\n"), 0o600), "write config")
	cmd := exec.Command(bin, "edge", "--config", cfgPath)
	cmd.Env = append(os.Environ(), "TOLLGATE_POSTGRES_URL="+pg.URL, "TOLLGATE_EDGE_LISTEN="+addr,
		"TOLLGATE_EDGE_UPSTREAM="+up.URL, "TOLLGATE_EDGE_SPOOL_DIR="+t.TempDir(), "TOLLGATE_EDGE_ADMIN_LISTEN=",
		"TOLLGATE_KAFKA_BROKERS="+strings.Join(testenv.KafkaBrokers(), ","), "TOLLGATE_REDIS_ADDR="+testenv.RedisAddr())
	stderr, err := cmd.StderrPipe()
	testenv.Must(t, err, "pipe stderr")
	testenv.Must(t, cmd.Start(), "start the edge")
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	var logs strings.Builder
	said := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			said <- sc.Text()
		}
		close(said)
	}()
	waitFor := func(what string) {
		t.Helper()
		deadline := time.After(60 * time.Second)
		for {
			select {
			case line, ok := <-said:
				if !ok {
					t.Fatalf("the edge ended before it said %q:\n%s", what, logs.String())
				}
				logs.WriteString(line + "\n")
				if strings.Contains(line, what) {
					return
				}
			case <-deadline:
				t.Fatalf("the edge never said %q:\n%s", what, logs.String())
			}
		}
	}
	waitFor("edge listening")
	conn, err := net.Dial("tcp", addr)
	testenv.Must(t, err, "dial the edge")
	defer conn.Close()
	_, err = fmt.Fprintf(conn, "POST /v1/widgets HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer %s\r\nContent-Length: 100\r\n\r\nab", key)
	testenv.Must(t, err, "send a stalled upload")
	time.Sleep(500 * time.Millisecond) // admitted and proxied, its body awaited
	testenv.Must(t, cmd.Process.Signal(syscall.SIGTERM), "signal the edge")
	waitFor("shutting down")
	// The first signal's handling lets go of the signals just after it
	// logs this; an operator's second one comes later still.
	time.Sleep(time.Second)
	second := time.Now()
	// SIGTERM again: a process started in the background (as CI may
	// start the tests) inherits SIGINT ignored, and Go leaves it ignored
	// once nothing asks for it.
	testenv.Must(t, cmd.Process.Signal(syscall.SIGTERM), "signal the edge again")
	exited := make(chan error, 1)
	go func() {
		for line := range said {
			logs.WriteString(line + "\n")
		}
		exited <- cmd.Wait()
	}()
	select {
	case err := <-exited:
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
			t.Fatalf("the edge ended with %v, want killed by the second signal:\n%s", err, logs.String())
		}
		t.Logf("ended %s after the second signal", time.Since(second).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatalf("the edge still ran 5 s after a second signal (the stop waits up to 15 s for the stalled call); alive: %v", cmd.Process.Signal(syscall.Signal(0)))
	}
}

// readyz is the status of GET url/readyz, and how long the answer took.
func readyz(t *testing.T, base string) (int, time.Duration) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	began := time.Now()
	resp, err := c.Get(base + "/readyz")
	if err != nil {
		t.Fatalf("GET %s/readyz: %v after %s", base, err, time.Since(began).Round(time.Millisecond))
	}
	resp.Body.Close()
	return resp.StatusCode, time.Since(began)
}

// Every component answers /readyz: ready while the services it needs
// answer, 503 within about a second once one goes silent. Only the edge had
// one; the usage API's and the invoice API's /healthz said only that the
// process served, and ingest had no health endpoint at all.
func TestEveryComponentsReadinessFollowsItsServices(t *testing.T) {
	ctx := context.Background()
	run := func(t *testing.T, c component) {
		stop := runComponent(t, c)
		t.Cleanup(func() { stop(); _ = c.Close() })
	}
	check := func(t *testing.T, base string, f *testenv.Freezer) {
		t.Helper()
		testenv.Wait(t, 10*time.Second, base+"/readyz ready", func() bool { st, _ := readyz(t, base); return st == http.StatusOK })
		f.Freeze()
		for i := range 2 {
			if st, took := readyz(t, base); st != http.StatusServiceUnavailable || took > 3*time.Second {
				t.Fatalf("probe %d with a service silent: %d after %s, want 503 within about a second", i, st, took.Round(time.Millisecond))
			}
		}
	}
	t.Run("usage API and the aggregator's metrics listener", func(t *testing.T) {
		pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
		f, silent := pg.Freezable(t)
		cfg := testConfig(t, pg, ch, "unused")
		cfg.Services.PostgresURL, cfg.Aggregator.MetricsListen = silent, "127.0.0.1:0"
		m, err := NewAggregateMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start the aggregator")
		run(t, m)
		metricsReady(t, "http://"+m.MetricsAddr())
		check(t, "http://"+m.Addr(), f)
		metricsNotReady(t, "http://"+m.MetricsAddr())
	})
	t.Run("invoice API and the invoicer's metrics listener", func(t *testing.T) {
		pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
		f, silent := pg.Freezable(t)
		cfg := testConfig(t, pg, ch, "unused")
		cfg.Services.PostgresURL, cfg.Invoicer.MetricsListen = silent, "127.0.0.1:0"
		m, err := NewInvoiceMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start the invoicer")
		run(t, m)
		metrics := "http://" + m.MetricsAddr()
		metricsReady(t, metrics)
		// The invoicer's own metrics are served, its first run counted.
		testenv.Wait(t, 10*time.Second, "the first run counted on /metrics", func() bool {
			resp, err := http.Get(metrics + "/metrics")
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return strings.Contains(string(b), `tollgate_invoicer_runs_total{result="ok"} 1`)
		})
		check(t, "http://"+m.Addr(), f)
		metricsNotReady(t, metrics)
	})
	t.Run("ingest's metrics listener", func(t *testing.T) {
		pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
		f := testenv.NewFreezer(t, ch.Addr)
		cfg := testConfig(t, pg, ch, "ready."+testenv.Name(t))
		cfg.Services.ClickHouseAddr, cfg.Ingest.MetricsListen = f.Addr(), "127.0.0.1:0"
		m, err := NewIngestMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start ingest")
		run(t, m)
		check(t, "http://"+m.MetricsAddr(), f)
	})
}

// metricsReady waits until the metrics listener at base is ready.
func metricsReady(t *testing.T, base string) {
	t.Helper()
	testenv.Wait(t, 10*time.Second, "the metrics listener ready", func() bool { st, _ := readyz(t, base); return st == http.StatusOK })
}

// metricsNotReady checks that the metrics listener at base is not ready
// (a service its component needs is silent).
func metricsNotReady(t *testing.T, base string) {
	t.Helper()
	if st, _ := readyz(t, base); st != http.StatusServiceUnavailable {
		t.Errorf("the metrics listener's /readyz: %d with Postgres silent, want 503", st)
	}
}

// runComponent runs c until the returned stop, which waits for Run to
// return (at the test's end at the latest); Close is the caller's.
func runComponent(t *testing.T, c component) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}
