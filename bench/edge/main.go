// Command edge benchmarks the Tollgate edge against its peers on loopback,
// in one run: (a) straight to a tiny upstream, (b) a plain nginx reverse
// proxy, (c) nginx with limit_req and a key map (the stock-parts gateway)
// keeping the proxy contract the edge keeps, and the same without the
// request id and forwarding headers, (d) a plain Go reverse proxy (the
// standard library's, no features), (e) a plain fasthttp reverse proxy,
// (f) the same metering each call to Kafka through the edge's producer and
// nothing else, (g) the Tollgate edge with key auth, the Redis rate limit
// and metering to Kafka. Throughput is measured with wrk for a fixed
// duration; the latency overhead is the edge's p99 minus the direct p99 at
// a fixed moderate rate. Each measurement runs in -repeat interleaved
// rounds (3) and each target's best round counts. The upstream runs in a
// process of its own, as an operator's API does: served from the process
// that hosts the edge, it shared the edge's Go scheduler and flattered the
// edge's ratio by about a tenth (-upstream-in-process repeats that). The
// last line is the RESULT line.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/redis/go-redis/v9"
	"github.com/segmentio/kafka-go"
	"github.com/valyala/fasthttp"

	"github.com/tollgate-dev/tollgate/bench/internal/memprof"
	"github.com/tollgate-dev/tollgate/bench/internal/procstat"
	"github.com/tollgate-dev/tollgate/edge"
	edgefast "github.com/tollgate-dev/tollgate/edge/fasthttp"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/internal/gctune"
	"github.com/tollgate-dev/tollgate/schemas"
)

// upstreamChild, set in its environment, makes this command the tiny
// upstream, serving on the listener it inherits as file descriptor 3 until
// its standard input closes.
const upstreamChild = "TOLLGATE_BENCH_UPSTREAM_CHILD"

func main() {
	if os.Getenv(upstreamChild) == "1" {
		fmt.Fprintln(os.Stderr, "bench-edge upstream:", serveUpstream())
		os.Exit(1)
	}
	// The same garbage-collector setting as the tollgate command.
	fmt.Printf("GOGC=%d (as tollgate runs; set GOGC to override)\n", gctune.Apply())
	fmt.Printf("GOMAXPROCS=%d; nginx runs worker_processes auto, one per CPU (%d)\n", runtime.GOMAXPROCS(0), runtime.NumCPU())
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-edge:", err)
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func listen() (net.Listener, string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	return ln, ln.Addr().String()
}

func freeAddr() string {
	ln, addr := listen()
	_ = ln.Close()
	return addr
}

func run() error {
	dur := flag.Duration("duration", 5*time.Second, "wrk duration per target")
	conns := flag.Int("connections", 64, "wrk connections")
	rate := flag.Int("rate", 1000, "fixed request rate for the latency comparison")
	repeat := flag.Int("repeat", 3, "rounds over every target; each target's best round counts (the machine is shared and noisy)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of this process during the first measured wrk run of -profile-target")
	linger := flag.Duration("event-linger", 0, "the edge's edge.event_linger (0: its default)")
	memprofile := flag.String("memprofile", "", "write a heap allocation profile of this process (allocations since it started) after the first measured wrk run of -profile-target")
	only := flag.String("targets", "", "comma-separated targets to measure, for a diagnosis (all when empty); a partial run ends with a RESULT line of each measured target's throughput and CPU per call, without the p99 comparison")
	upInProcess := flag.Bool("upstream-in-process", false, "serve the tiny upstream from this process, which also hosts the edge and the Go proxies (runs before the upstream had a process of its own did so)")
	profileTarget := flag.String("profile-target", "edge", "the target -cpuprofile and -memprofile profile: direct, nginx, nginx_limit, nginx_limit_bare, go_proxy, fast_proxy, metered_proxy or edge")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx := context.Background()
	tmp, err := os.MkdirTemp("", "tollgate-bench-edge-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// The tiny upstream, in a process of its own (an operator's API is not
	// in the gateway's process), or in this one with -upstream-in-process.
	upLn, upAddr := listen()
	if *upInProcess {
		up := &http.Server{Handler: upstream()}
		go func() { _ = up.Serve(upLn) }()
		defer up.Close()
	} else {
		stopUp, err := startUpstream(upLn)
		if err != nil {
			return err
		}
		defer stopUp()
	}

	// A plain Go reverse proxy (the standard library's, with the edge's
	// connection pool, flush settings and buffer reuse, and nothing else): the ceiling for
	// any proxy built on Go's HTTP stack on this machine, so the report can
	// tell the cost of the edge's work from the cost of the stack it runs on.
	target, _ := url.Parse("http://" + upAddr)
	goProxy := httputil.NewSingleHostReverseProxy(target)
	goProxy.Transport = &http.Transport{MaxIdleConns: 1024, MaxIdleConnsPerHost: 1024, IdleConnTimeout: 90 * time.Second}
	goProxy.FlushInterval = 10 * time.Millisecond
	goProxy.BufferPool = &copyBuffers{}
	goProxy.ErrorLog = stdlog.New(io.Discard, "", 0) // wrk hanging up at the end is not news
	goLn, goAddr := listen()
	goSrv := &http.Server{Handler: goProxy, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = goSrv.Serve(goLn) }()
	defer goSrv.Close()

	// A plain fasthttp reverse proxy (one host client, the Authorization
	// header dropped, nothing else): the ceiling for the edge's own HTTP
	// stack on this machine.
	fastLn, fastAddr := listen()
	fastClient := &fasthttp.HostClient{Addr: upAddr, MaxConns: 1024, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
	fastSrv := &fasthttp.Server{NoDefaultServerHeader: true, NoDefaultContentType: true, Handler: func(ctx *fasthttp.RequestCtx) {
		ctx.Request.Header.Del("Authorization")
		if err := fastClient.Do(&ctx.Request, &ctx.Response); err != nil {
			ctx.Error("upstream unavailable", fasthttp.StatusBadGateway)
		}
	}}
	go func() { _ = fastSrv.Serve(fastLn) }()
	defer fastSrv.Shutdown()

	// The same plain fasthttp proxy, metering each call to Kafka through
	// the edge's own producer (one event per call, as the edge emits it),
	// with no keys, limits or rate-limit headers: what metering every call
	// through Kafka costs on this machine, whoever does it.
	meterBrokers := strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")
	meter, err := newProducer(ctx, meterBrokers, "tollgate.bench.metered", filepath.Join(tmp, "metered-spool"), *linger, log)
	if err != nil {
		return err
	}
	defer func() {
		_ = meter.Close()
		dropTopic(meterBrokers, "tollgate.bench.metered")
	}()
	meteredLn, meteredAddr := listen()
	meteredClient := &fasthttp.HostClient{Addr: upAddr, MaxConns: 1024, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
	meteredSrv := &fasthttp.Server{NoDefaultServerHeader: true, NoDefaultContentType: true, Handler: func(ctx *fasthttp.RequestCtx) {
		start := time.Now()
		id := schemas.NewEventID()
		ctx.Request.Header.Del("Authorization")
		if err := meteredClient.Do(&ctx.Request, &ctx.Response); err != nil {
			ctx.Error("upstream unavailable", fasthttp.StatusBadGateway)
		}
		meter.Emit(schemas.Event{Version: schemas.EventVersion, ID: id, AccountID: "acct_bench_metered", Environment: schemas.Live,
			KeyID: "key_bench_metered", Type: "api_call", Time: start, Route: "/v1/widgets/{id}", Method: string(ctx.Method()),
			Status: ctx.Response.StatusCode(), LatencyMicros: time.Since(start).Microseconds(),
			ResponseBytes: int64(len(ctx.Response.Body())), Units: 1, RequestID: edge.RequestIDFor(id)})
	}}
	go func() { _ = meteredSrv.Serve(meteredLn) }()
	defer meteredSrv.Shutdown()

	// The Tollgate edge, wired as `tollgate edge` wires it.
	limits := &edgeLimits{}
	key, ident, stopEdge, edgeAddr, err := startEdge(ctx, tmp, "http://"+upAddr, *linger, limits, log)
	if err != nil {
		return err
	}
	defer stopEdge()

	// nginx: plain, with limit_req plus a key map, and the latter without
	// the request id and forwarding headers.
	plainAddr, limitAddr, bareAddr := freeAddr(), freeAddr(), freeAddr()
	stopNginx, err := startNginx(tmp, upAddr, plainAddr, limitAddr, bareAddr, key, identityHeaders(ident))
	if err != nil {
		return err
	}
	defer stopNginx()

	auth := "Authorization: Bearer " + key
	targets := []struct{ name, url string }{
		{"direct", "http://" + upAddr + "/v1/widgets/1"},
		{"nginx", "http://" + plainAddr + "/v1/widgets/1"},
		{"nginx_limit", "http://" + limitAddr + "/v1/widgets/1"},
		{"nginx_limit_bare", "http://" + bareAddr + "/v1/widgets/1"},
		{"go_proxy", "http://" + goAddr + "/v1/widgets/1"},
		{"fast_proxy", "http://" + fastAddr + "/v1/widgets/1"},
		{"metered_proxy", "http://" + meteredAddr + "/v1/widgets/1"},
		{"edge", "http://" + edgeAddr + "/v1/widgets/1"},
	}
	// Every target is measured in each of -repeat rounds, interleaved, and
	// its best round counts: the highest throughput, the lowest p99. A
	// neighbour's burst on the shared machine then costs a round, not the
	// result, and every target gets the same benefit of the doubt.
	*repeat = max(*repeat, 1)
	if *only != "" {
		want := map[string]bool{}
		for _, name := range strings.Split(*only, ",") {
			want[strings.TrimSpace(name)] = true
		}
		var kept []struct{ name, url string }
		for _, tg := range targets {
			if want[tg.name] {
				kept = append(kept, tg)
				delete(want, tg.name)
			}
		}
		if len(want) > 0 || len(kept) == 0 {
			return fmt.Errorf("-targets %q: want some of direct, nginx, nginx_limit, nginx_limit_bare, go_proxy, fast_proxy, metered_proxy, edge", *only)
		}
		targets = kept
	}
	// The two gateways compared in the RESULT line keep the same proxy
	// contract; check it before measuring.
	for _, tg := range targets {
		if tg.name == "edge" || tg.name == "nginx_limit" {
			if err := checkContract(tg.name, strings.TrimSuffix(tg.url, "/v1/widgets/1"), key, identityHeaders(ident)); err != nil {
				return err
			}
		}
	}
	cpu, cpuErr := targetCPU(plainAddr, upAddr, *upInProcess)
	if cpuErr != nil {
		fmt.Println("cpu per call not measured:", cpuErr)
	}
	cpuPerCall := map[string]float64{}
	rps := map[string]float64{}
	allocs := map[string]float64{}
	var scriptsPerCall, leasedShare float64
	// Every call of the edge and of the metered proxy is one event in its
	// topic: after each run the bench waits, inside the run's CPU span,
	// until the topic holds exactly the calls wrk completed, so the
	// delivery's CPU counts for the target that made it (not the next one)
	// and a run that lost or doubled events fails.
	metered := newMeteredTopics(ctx, map[string]string{"metered_proxy": "tollgate.bench.metered", "edge": "tollgate.bench.edge"})
	for _, tg := range targets {
		// Warm up connections and caches.
		_, calls, err := wrkCalls(tg.url, auth, 2*time.Second, *conns)
		if err != nil {
			return err
		}
		if err := metered.landed(ctx, tg.name, calls, int64(*conns)); err != nil {
			return err
		}
	}
	for round := 1; round <= *repeat; round++ {
		for _, tg := range targets {
			stopProfile, err := profileIf(*cpuprofile != "" && tg.name == *profileTarget && round == 1, *cpuprofile)
			if err != nil {
				return err
			}
			runs0, calls0 := limits.limiter.Batched()
			leased0, _ := limits.limiter.Leased()
			span := cpu[tg.name].Begin()
			mallocs0 := mallocs()
			r, calls, err := wrkCalls(tg.url, auth, *dur, *conns)
			if err == nil {
				err = metered.landed(ctx, tg.name, calls, int64(*conns))
			}
			heapAllocs := float64(mallocs()-mallocs0) / (r * dur.Seconds())
			stopProfile()
			if *memprofile != "" && tg.name == *profileTarget && round == 1 {
				if err := memprof.WriteAllocs(*memprofile); err != nil {
					return err
				}
			}
			if err != nil {
				return err
			}
			// Heap allocations per call in this process (the upstream's
			// too with -upstream-in-process) do not depend on how busy
			// the machine is, so they show a change in the edge's work
			// that the CPU figures' noise hides.
			if _, ok := allocs[tg.name]; !ok || heapAllocs < allocs[tg.name] {
				allocs[tg.name] = heapAllocs
			}
			used, others := span.End()
			parts := []string{fmt.Sprintf("this process %.1f", float64(used.Microseconds())/(r*dur.Seconds()))}
			for _, o := range others {
				used += o.CPU
				parts = append(parts, fmt.Sprintf("%s %.1f", o.Name, float64(o.CPU.Microseconds())/(r*dur.Seconds())))
			}
			rps[tg.name] = max(rps[tg.name], r)
			fmt.Printf("round %d %-16s %10.0f req/s  (wrk, %d connections, %s)\n", round, tg.name, r, *conns, *dur)
			if cpuErr == nil {
				us := float64(used.Microseconds()) / (r * dur.Seconds())
				if cur, ok := cpuPerCall[tg.name]; !ok || us < cur {
					cpuPerCall[tg.name] = us
				}
				fmt.Printf("round %d %-16s %10.1f µs CPU per call (%s: %s)\n", round, tg.name, us, cpuWho[tg.name], strings.Join(parts, " + "))
			}
			if tg.name == "edge" {
				runs, calls := limits.limiter.Batched()
				leased, _ := limits.limiter.Leased()
				decided := float64(leased - leased0 + calls - calls0)
				scriptsPerCall = float64(runs-runs0) / max(1, decided)
				leasedShare = float64(leased-leased0) / max(1, decided)
				fmt.Printf("round %d %-16s %.1f%% of calls decided from a lease; %.3f Redis script runs per call (batched, leases asked ahead included)\n",
					round, tg.name, 100*leasedShare, scriptsPerCall)
			}
		}
	}
	if n := limits.fallbacks.Load(); n > 0 {
		return fmt.Errorf("the edge decided %d limits locally because Redis failed: its figures are not the edge's with Redis", n)
	}
	for _, tg := range targets {
		fmt.Printf("best    %-16s %10.0f req/s\n", tg.name, rps[tg.name])
	}
	for _, name := range []string{"direct", "go_proxy", "fast_proxy", "metered_proxy", "edge"} {
		if _, ok := allocs[name]; !ok {
			continue
		}
		if _, ok := allocs["direct"]; !ok {
			fmt.Printf("best    %-16s %10.1f heap allocations per call in this process\n", name, allocs[name])
			continue
		}
		fmt.Printf("best    %-16s %10.1f heap allocations per call in this process (%.1f beyond the direct run's)\n",
			name, allocs[name], allocs[name]-allocs["direct"])
	}
	if *only != "" {
		// A partial run: each measured target's best throughput and CPU
		// per call, to compare targets measured side by side.
		result := "RESULT"
		for _, tg := range targets {
			result += fmt.Sprintf(" %s_rps=%.0f", tg.name, rps[tg.name])
			if cpuErr == nil {
				result += fmt.Sprintf(" %s_cpu_us_per_call=%.1f", tg.name, cpuPerCall[tg.name])
			}
		}
		fmt.Println(result)
		return nil
	}
	p99 := map[string]time.Duration{}
	// Redis scripts per edge call: the edge talks to Redis only through
	// scripts (EVALSHA, or EVAL when a script is not cached yet), so the
	// scripts Redis ran over the fixed-rate run, divided by its calls.
	rdb := redis.NewClient(&redis.Options{Addr: env("TOLLGATE_REDIS_ADDR", "127.0.0.1:16379"), Username: os.Getenv("TOLLGATE_REDIS_USERNAME"), Password: os.Getenv("TOLLGATE_REDIS_PASSWORD")})
	defer rdb.Close()
	var perCall float64
	for round := 1; round <= *repeat; round++ {
		for _, tg := range targets {
			if tg.name != "direct" && tg.name != "edge" {
				continue
			}
			before, err := redisCommands(ctx, rdb)
			if err != nil {
				return err
			}
			d, errs := fixedRate(tg.url, key, *rate, 3*time.Second)
			if errs > 0 {
				return fmt.Errorf("%s: %d failed calls at %d/s", tg.name, errs, *rate)
			}
			after, err := redisCommands(ctx, rdb)
			if err != nil {
				return err
			}
			if tg.name == "edge" {
				perCall = float64(after-before) / float64(*rate*3)
				fmt.Printf("round %d %-16s %.2f Redis scripts per call (Redis's own count)\n", round, tg.name, perCall)
			}
			if cur, ok := p99[tg.name]; !ok || d < cur {
				p99[tg.name] = d
			}
			fmt.Printf("round %d %-16s p99 %8.3f ms at a fixed %d req/s\n", round, tg.name, float64(d.Microseconds())/1000, *rate)
		}
	}
	if n := limits.fallbacks.Load(); n > 0 {
		// The fixed-rate rounds too: an edge deciding limits without
		// Redis would report a cheaper p99.
		return fmt.Errorf("the edge decided %d limits locally because Redis failed: its figures are not the edge's with Redis", n)
	}
	for _, name := range []string{"direct", "edge"} {
		fmt.Printf("best    %-16s p99 %8.3f ms\n", name, float64(p99[name].Microseconds())/1000)
	}
	overhead := float64((p99["edge"] - p99["direct"]).Microseconds()) / 1000
	result := fmt.Sprintf("RESULT edge_rps=%.0f nginx_rps=%.0f nginx_limit_rps=%.0f ratio_vs_nginx_limit=%.2f p99_overhead_ms=%.3f go_proxy_rps=%.0f ratio_vs_go_proxy=%.2f fast_proxy_rps=%.0f ratio_vs_fast_proxy=%.2f metered_proxy_rps=%.0f metered_proxy_vs_nginx_limit=%.2f nginx_limit_bare_rps=%.0f ratio_vs_nginx_limit_bare=%.2f redis_scripts_per_call=%.2f redis_runs_per_call_under_load=%.3f leased_share=%.2f edge_allocs_per_call=%.1f",
		rps["edge"], rps["nginx"], rps["nginx_limit"], rps["edge"]/rps["nginx_limit"], overhead, rps["go_proxy"],
		rps["edge"]/rps["go_proxy"], rps["fast_proxy"], rps["edge"]/rps["fast_proxy"], rps["metered_proxy"], rps["metered_proxy"]/rps["nginx_limit"],
		rps["nginx_limit_bare"], rps["edge"]/rps["nginx_limit_bare"], perCall, scriptsPerCall, leasedShare, allocs["edge"]-allocs["direct"])
	if cpuErr == nil {
		for _, tg := range targets {
			fmt.Printf("best    %-16s %10.1f µs CPU per call\n", tg.name, cpuPerCall[tg.name])
		}
		result += fmt.Sprintf(" edge_cpu_us_per_call=%.1f nginx_limit_cpu_us_per_call=%.1f direct_cpu_us_per_call=%.1f cpu_ratio_vs_nginx_limit=%.2f",
			cpuPerCall["edge"], cpuPerCall["nginx_limit"], cpuPerCall["direct"], cpuPerCall["nginx_limit"]/cpuPerCall["edge"])
	}
	fmt.Println(result)
	return nil
}

// upstream is the tiny upstream's handler: a small JSON body, or on
// contractPath the headers the proxy in front sent, for checkContract.
func upstream() http.Handler {
	body := []byte(`{"ok":true}`)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == contractPath {
			_ = json.NewEncoder(w).Encode(r.Header)
			return
		}
		_, _ = w.Write(body)
	})
}

// serveUpstream is the upstream child's life: it serves on file descriptor
// 3 until its standard input, whose other end the parent holds, closes.
func serveUpstream() error {
	gctune.Apply()
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	ln, err := net.FileListener(os.NewFile(3, "upstream"))
	if err != nil {
		return err
	}
	return http.Serve(ln, upstream())
}

// startUpstream runs the tiny upstream in a child process serving ln, which
// it takes over, and returns its stop.
func startUpstream(ln net.Listener) (func(), error) {
	f, err := ln.(*net.TCPListener).File()
	_ = ln.Close()
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	defer f.Close()
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), upstreamChild+"=1")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	return func() { _ = stdin.Close(); _ = cmd.Wait() }, nil
}

// contractPath is the upstream path that answers with the headers it got.
const contractPath = "/v1/widgets/headers"

// checkContract sends one call through the gateway at base and checks the
// proxy contract the edge keeps: a Request-Id on the response, and the
// upstream given that Request-Id and X-Forwarded-For, -Host and -Proto but
// not the key.
func checkContract(name, base, key string, ident map[string]string) error {
	req, _ := http.NewRequest("GET", base+contractPath, nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s: contract check: %w", name, err)
	}
	defer resp.Body.Close()
	var got http.Header
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		return fmt.Errorf("%s: contract check: status %d: %w", name, resp.StatusCode, err)
	}
	rid := resp.Header.Get("Request-Id")
	switch {
	case rid == "":
		return fmt.Errorf("%s: contract check: no Request-Id on the response", name)
	case got.Get("Request-Id") != rid:
		return fmt.Errorf("%s: contract check: the upstream got Request-Id %q, the caller %q", name, got.Get("Request-Id"), rid)
	case got.Get("X-Forwarded-For") == "" || got.Get("X-Forwarded-Host") == "" || got.Get("X-Forwarded-Proto") == "":
		return fmt.Errorf("%s: contract check: X-Forwarded-* missing upstream: %v", name, got)
	case got.Get("Authorization") != "":
		return fmt.Errorf("%s: contract check: the key reached the upstream", name)
	}
	for h, want := range ident {
		if v := got.Values(h); len(v) != 1 || v[0] != want {
			return fmt.Errorf("%s: contract check: the upstream got %s %q, want %q", name, h, v, want)
		}
	}
	return nil
}

// identityHeaders are the headers that tell the upstream who is calling
// with the bench's key, as the edge sends them.
func identityHeaders(id edge.Identity) map[string]string {
	return map[string]string{
		edge.HeaderAccount: id.Account, edge.HeaderEnvironment: id.Environment, edge.HeaderKeyID: id.KeyID,
		edge.HeaderPlan: id.Plan, edge.HeaderScopes: string(id.AppendScopes(nil)),
	}
}

// cpuWho says whose CPU time counts for each target: every process serving
// the call except the load generator. This process (which hosts the Go
// proxies and the edge) and the upstream's count for every target.
var cpuWho = map[string]string{
	"direct":           "upstream",
	"nginx":            "upstream + nginx",
	"nginx_limit":      "upstream + nginx",
	"nginx_limit_bare": "upstream + nginx",
	"go_proxy":         "upstream + Go proxy",
	"fast_proxy":       "upstream + fasthttp proxy",
	"metered_proxy":    "upstream + fasthttp proxy + Kafka",
	"edge":             "upstream + edge + Redis + Kafka",
}

// targetCPU is, per target, the processes outside this one whose CPU time
// counts for it: the upstream's (unless it is in this process) for every
// target, nginx's master and workers for the nginx targets, the Kafka broker
// for the metered proxy, and the Redis server and Kafka broker for the edge.
// When this fails, CPU per call is not reported.
func targetCPU(nginxAddr, upAddr string, upInProcess bool) (map[string]*procstat.Meter, error) {
	brokers := strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")
	if len(brokers) > 1 {
		return nil, errors.New("more than one Kafka broker")
	}
	others := map[string][][2]string{
		"nginx":            {{"nginx", nginxAddr}},
		"nginx_limit":      {{"nginx", nginxAddr}},
		"nginx_limit_bare": {{"nginx", nginxAddr}},
		"metered_proxy":    {{"kafka", brokers[0]}},
		"edge":             {{"redis", env("TOLLGATE_REDIS_ADDR", "127.0.0.1:16379")}, {"kafka", brokers[0]}},
	}
	meters := map[string]*procstat.Meter{}
	for name := range cpuWho {
		m := &procstat.Meter{}
		watch := others[name]
		if !upInProcess {
			watch = append([][2]string{{"upstream", upAddr}}, watch...)
		}
		for _, w := range watch {
			if err := m.Watch(w[0], w[1]); err != nil {
				return nil, err
			}
		}
		meters[name] = m
	}
	return meters, nil
}

// redisCommands is how many scripts Redis has run since it started
// (EVALSHA and EVAL calls, from INFO commandstats).
func redisCommands(ctx context.Context, rdb *redis.Client) (int64, error) {
	info, err := rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		return 0, fmt.Errorf("redis info (is Redis up? make services): %w", err)
	}
	var n int64
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		for _, cmd := range []string{"cmdstat_evalsha:calls=", "cmdstat_eval:calls="} {
			if v, ok := strings.CutPrefix(line, cmd); ok {
				calls, _, _ := strings.Cut(v, ",")
				c, err := strconv.ParseInt(calls, 10, 64)
				if err != nil {
					return 0, fmt.Errorf("redis info: %q: %w", line, err)
				}
				n += c
			}
		}
	}
	return n, nil
}

// mallocs is how many heap objects this process has allocated so far.
func mallocs() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Mallocs
}

// profileIf starts a CPU profile into path when on, and returns its stop.
func profileIf(on bool, path string) (func(), error) {
	if !on {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); _ = f.Close() }, nil
}

var wrkRPS = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
var wrkTotal = regexp.MustCompile(`(\d+) requests in `)
var wrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses:\s+(\d+)`)
var wrkSocketErrors = regexp.MustCompile(`Socket errors:[^\n]*`)

func wrk(url, header string, d time.Duration, conns int) (float64, error) {
	rps, _, err := wrkCalls(url, header, d, conns)
	return rps, err
}

// wrkCalls is wrk's throughput and the number of calls it completed.
func wrkCalls(url, header string, d time.Duration, conns int) (float64, int64, error) {
	if d < time.Second || d%time.Second != 0 {
		// wrk takes whole seconds, and the figures per call divide by d.
		return 0, 0, fmt.Errorf("wrk %s: duration %s: want whole seconds, at least one", url, d)
	}
	bin := env("WRK", "/usr/bin/wrk")
	out, err := exec.Command(bin, "-t2", "-c"+strconv.Itoa(conns), "-d"+strconv.Itoa(int(d.Seconds()))+"s",
		"-H", header, url).CombinedOutput()
	if err != nil {
		return 0, 0, fmt.Errorf("wrk %s: %v\n%s", url, err, out)
	}
	if m := wrkNon2xx.FindSubmatch(out); m != nil {
		return 0, 0, fmt.Errorf("wrk %s: %s non-2xx responses (limits too low for the bench?)\n%s", url, m[1], out)
	}
	// Calls that failed on the socket (refused, reset, timed out) are not
	// in Requests/sec, and a target that failed some would look as fast
	// as its successes.
	if m := wrkSocketErrors.Find(out); m != nil {
		return 0, 0, fmt.Errorf("wrk %s: %s\n%s", url, m, out)
	}
	m := wrkRPS.FindSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("wrk %s: no Requests/sec in\n%s", url, out)
	}
	rps, err := strconv.ParseFloat(string(m[1]), 64)
	if err == nil && rps <= 0 {
		err = fmt.Errorf("wrk %s: no call completed\n%s", url, out)
	}
	var total int64
	if t := wrkTotal.FindSubmatch(out); t != nil {
		total, _ = strconv.ParseInt(string(t[1]), 10, 64)
	} else if err == nil {
		err = fmt.Errorf("wrk %s: no request count in\n%s", url, out)
	}
	return rps, total, err
}

// fixedRate sends calls at rate for d, each on an idle keep-alive
// connection, and returns the p99 latency.
func fixedRate(url, key string, rate int, d time.Duration) (time.Duration, int) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: 5 * time.Second}
	n := int(float64(rate) * d.Seconds())
	lat := make([]time.Duration, n)
	var errs int
	var mu sync.Mutex
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; i < n; i++ {
		<-tick.C
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			req, _ := http.NewRequest("GET", url, nil)
			req.Header.Set("Authorization", "Bearer "+key)
			start := time.Now()
			resp, err := client.Do(req)
			if err == nil {
				buf := make([]byte, 512)
				for {
					if _, e := resp.Body.Read(buf); e != nil {
						break
					}
				}
				resp.Body.Close()
			}
			lat[i] = time.Since(start)
			if err != nil || resp.StatusCode != 200 {
				mu.Lock()
				errs++
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	return lat[n*99/100], errs
}

// startNginx starts nginx with three servers on the same upstream: plain, a
// plain reverse proxy; limited, the stock-parts gateway, which checks the key
// through a map, applies limit_req and keeps the proxy contract the edge
// keeps (a Request-Id on every response and to the upstream, X-Forwarded-For,
// -Host and -Proto, the identity headers, the key dropped); and bare, the same gateway without the
// request id and forwarding headers, as this bench measured it before.
func startNginx(tmp, upstream, plain, limited, bare, key string, ident map[string]string) (func(), error) {
	bin := env("NGINX", "/usr/sbin/nginx")
	// The key map gives the limited gateway the caller's identity headers
	// too, one map each, as the edge sends them (and a caller's own copies
	// of those names are replaced).
	var maps, sets strings.Builder
	names := make([]string, 0, len(ident))
	for h := range ident {
		names = append(names, h)
	}
	sort.Strings(names)
	for i, h := range names {
		fmt.Fprintf(&maps, "  map $http_authorization $identity_%d {\n    default \"\";\n    \"Bearer %s\" \"%s\";\n  }\n", i, key, ident[h])
		fmt.Fprintf(&sets, "      proxy_set_header %s $identity_%d;\n", h, i)
	}
	conf := fmt.Sprintf(`worker_processes auto;
error_log %[1]s/error.log warn;
pid %[1]s/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream api { server %[2]s; keepalive 128; }
  map $http_authorization $api_key {
    default "";
    "Bearer %[5]s" "%[5]s";
  }
%[7]s  limit_req_zone $api_key zone=perkey:10m rate=1000000r/s;
  server {
    listen %[3]s;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen %[4]s;
    location / {
      if ($api_key = "") { return 401; }
      limit_req zone=perkey burst=1000000 nodelay;
      add_header Request-Id $request_id always;
      proxy_set_header Authorization "";
      proxy_set_header Request-Id $request_id;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Proto $scheme;
%[8]s      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen %[6]s;
    location / {
      if ($api_key = "") { return 401; }
      limit_req zone=perkey burst=1000000 nodelay;
      proxy_set_header Authorization "";
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`, tmp, upstream, plain, limited, key, bare, maps.String(), sets.String())
	path := filepath.Join(tmp, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "-p", tmp, "-c", path, "-g", "daemon off;")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start nginx: %w", err)
	}
	// A TERM to the master stops its workers too; a KILL would leave them
	// running, holding their ports, after the bench has ended.
	stop := func() {
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, a := range []string{plain, limited, bare} {
		for {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				stop()
				return nil, fmt.Errorf("nginx did not listen on %s", a)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return stop, nil
}

// meteredTopics follows the topics the metering targets write: how many
// events each holds beyond what it held at the start, and how many it
// should.
type meteredTopics struct {
	client *kafka.Client
	topics map[string]string // target: topic
	base   map[string]int64
	want   map[string]int64
	err    error
}

func newMeteredTopics(ctx context.Context, topics map[string]string) *meteredTopics {
	m := &meteredTopics{client: &kafka.Client{Addr: kafka.TCP(strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")...), Timeout: 10 * time.Second},
		topics: topics, base: map[string]int64{}, want: map[string]int64{}}
	for name, topic := range topics {
		n, err := m.end(ctx, topic)
		if err != nil {
			m.err = err
		}
		m.base[name] = n
	}
	return m
}

// end is the sum of topic's partitions' end offsets.
func (m *meteredTopics) end(ctx context.Context, topic string) (int64, error) {
	md, err := m.client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{topic}})
	if err != nil {
		return 0, err
	}
	var reqs []kafka.OffsetRequest
	for _, t := range md.Topics {
		for _, p := range t.Partitions {
			reqs = append(reqs, kafka.LastOffsetOf(p.ID))
		}
	}
	res, err := m.client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{topic: reqs}})
	if err != nil {
		return 0, err
	}
	var n int64
	for _, p := range res.Topics[topic] {
		if p.Error != nil {
			return 0, p.Error
		}
		n += p.LastOffset
	}
	return n, nil
}

// landed waits until target's topic holds calls more events, and fails
// if they do not come within a minute, or if more come than calls and the
// inflight ones: wrk counts only the calls it saw answered, and stops with
// up to one call on each connection still in flight, which the target
// answers and meters after wrk has hung up. A target that meters nothing
// passes.
func (m *meteredTopics) landed(ctx context.Context, target string, calls, inflight int64) error {
	topic, ok := m.topics[target]
	if !ok {
		return nil
	}
	if m.err != nil {
		return fmt.Errorf("%s's topic %s: %w", target, topic, m.err)
	}
	m.want[target] += calls
	deadline := time.Now().Add(time.Minute)
	for {
		n, err := m.end(ctx, topic)
		if err != nil {
			return fmt.Errorf("%s's topic %s: %w", target, topic, err)
		}
		got := n - m.base[target]
		switch {
		case got > m.want[target]+inflight:
			return fmt.Errorf("%s: %d events in %s for %d calls (and at most %d cut off in flight)", target, got, topic, m.want[target], inflight)
		case got >= m.want[target]:
			// Settled, the calls cut off in flight included: a moment
			// later nothing more comes.
			time.Sleep(100 * time.Millisecond)
			if again, err := m.end(ctx, topic); err != nil || again != n {
				continue
			}
			m.want[target] = got
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("%s: %d events in %s a minute after %d calls", target, got, topic, m.want[target])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// edgeLimits is what the bench reads of the edge's limiter: the Redis
// limiter, for its batching and lease counts, and the calls decided by the
// local fallback because Redis failed, which would make the edge's figures
// not the edge's with Redis.
type edgeLimits struct {
	limiter   *edgeredis.Limiter
	fallbacks atomic.Int64
}

func startEdge(ctx context.Context, tmp, upstream string, linger time.Duration, limits *edgeLimits, log *slog.Logger) (string, edge.Identity, func(), string, error) {
	pgURL := env("TOLLGATE_POSTGRES_URL", "postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable")
	brokers := strings.Split(env("TOLLGATE_KAFKA_BROKERS", "127.0.0.1:19092"), ",")
	redisAddr := env("TOLLGATE_REDIS_ADDR", "127.0.0.1:16379")
	db, err := sql.Open("pgx", pgURL)
	if err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	if _, err := schemas.MigratePostgres(ctx, db); err != nil {
		db.Close()
		return "", edge.Identity{}, nil, "", fmt.Errorf("migrate postgres (start the services with `make services`): %w", err)
	}
	db.Close()
	pool, err := pgxpool.New(ctx, pgURL)
	if err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	store := edgepg.NewKeyStore(pool)
	const account = "acct_bench_edge"
	if err := store.EnsureAccount(ctx, account, "Edge benchmark"); err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	// A plan sized so the bench measures the limiter's cost, not refusals.
	def, _ := json.Marshal(map[string]any{"limits": map[string]any{"requests_per_second": 10_000_000, "burst": 10_000_000, "monthly_requests": nil}})
	if _, err := pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('bench', 1, 'Bench', 'usd', $1)
		ON CONFLICT DO NOTHING`, def); err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	if _, err := pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at)
		VALUES ($1, $2, 'bench', 1, clock_timestamp())`, "sub_"+schemas.NewEventID().String(), account); err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	secret, parsed, err := edge.GenerateKey(edge.Secret, schemas.Live)
	if err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	keyID := "key_bench_" + schemas.NewEventID().String()[24:]
	if err := store.CreateKey(ctx, edge.NewKey{ID: keyID, AccountID: account,
		Name: "bench", Parsed: parsed, Audit: edge.AuditInfo{Actor: "bench"}}); err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	producer, err := newProducer(ctx, brokers, "tollgate.bench.edge", filepath.Join(tmp, "spool"), linger, log)
	if err != nil {
		return "", edge.Identity{}, nil, "", err
	}
	cache := edge.NewKeyCache(store, 30*time.Second)
	lctx, cancel := context.WithCancel(context.Background())
	if err := edgepg.NewListener(pgURL, cache, log).Start(lctx); err != nil {
		cancel()
		return "", edge.Identity{}, nil, "", err
	}
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr, Username: os.Getenv("TOLLGATE_REDIS_USERNAME"), Password: os.Getenv("TOLLGATE_REDIS_PASSWORD"), PoolSize: 256, DialerRetries: 1, MaxRetries: -1})
	limits.limiter = edgeredis.NewLimiter(rdb)
	lim := &edge.FallbackLimiter{Primary: limits.limiter, Local: edge.NewLocalLimiter(1),
		OnFallback: func(string, error) { limits.fallbacks.Add(1) }}
	srv, err := edge.NewServer(edge.Config{Upstream: upstream, RateLimitPrefix: "tollgate:bench:"},
		edge.Deps{Keys: cache, Emitter: producer, Limiter: lim, Quota: lim, Log: log})
	if err != nil {
		cancel()
		return "", edge.Identity{}, nil, "", err
	}
	ln, addr := listen()
	front, err := edgefast.New(srv, log)
	if err != nil {
		cancel()
		return "", edge.Identity{}, nil, "", err
	}
	go func() { _ = front.Serve(ln) }()
	stop := func() {
		_, _ = front.Close()
		_ = producer.Close()
		dropTopic(brokers, "tollgate.bench.edge")
		cancel()
		_ = rdb.Close()
		pool.Close()
	}
	ident := edge.IdentityOf(&edge.Key{ID: keyID, AccountID: account, Environment: schemas.Live, Kind: edge.Secret, Plan: edge.Plan{ID: "bench"}})
	return secret, ident, stop, addr, nil
}

// newProducer makes topic (four partitions) if it is not there and returns
// the edge's event producer on it, as `tollgate edge` configures it.
func newProducer(ctx context.Context, brokers []string, topic, spool string, linger time.Duration, log *slog.Logger) (*edgekafka.Producer, error) {
	kc := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 15 * time.Second}
	res, err := kc.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 4, ReplicationFactor: 1}}})
	if err != nil {
		return nil, fmt.Errorf("create topic (is Kafka up?): %w", err)
	}
	if e := res.Errors[topic]; e != nil && !errors.Is(e, kafka.TopicAlreadyExists) && !strings.Contains(e.Error(), "already exists") {
		return nil, fmt.Errorf("create topic: %w", e)
	}
	return edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: spool, Linger: linger}, nil, log)
}

// dropTopic deletes a bench topic once its run is over: every run writes
// a few million events to it, which the broker would otherwise keep.
func dropTopic(brokers []string, topic string) {
	kc := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 15 * time.Second}
	res, err := kc.DeleteTopics(context.Background(), &kafka.DeleteTopicsRequest{Topics: []string{topic}})
	if err == nil {
		err = res.Errors[topic] // the broker's refusal of this one topic
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-edge: delete topic %s: %v\n", topic, err)
	}
}

// copyBuffers reuses the plain proxy's copy buffers, as the edge does, so
// the peer is not slowed by garbage the edge does not make.
type copyBuffers struct{ p sync.Pool }

func (b *copyBuffers) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *copyBuffers) Put(buf []byte) { b.p.Put(&buf) }
