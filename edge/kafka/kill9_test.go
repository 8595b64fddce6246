package kafka_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

type edgeProc struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{} // closed when the process has exited
	err  error
}

func startEdgeProc(t *testing.T, bin, dir string, env *edgetest.Env, brokers, spool string) *edgeProc {
	t.Helper()
	addr := freeAddr(t)
	cfg := fmt.Sprintf(`services:
  postgres_url: %q
  kafka_brokers: [%q]
  redis_addr: %q
edge:
  listen: %q
  upstream: %q
  spool_dir: %q
  rate_limit_prefix: %q
  event_queue_size: %d
ingest:
  topic: %q
`, env.PG.URL, brokers, testenv.RedisAddr(), addr, env.LiveURL, spool, env.Redis.Prefix, killQueueSize, env.Topic)
	path := filepath.Join(dir, "edge-"+filepath.Base(addr)+".yaml")
	testenv.Must(t, os.WriteFile(path, []byte(cfg), 0o600), "write config")
	cmd := exec.Command(bin, "edge", "-c", path, "--log-level", "error")
	cmd.Env = testenv.ChildEnv() // the file, not `make test`'s environment, says where things are
	cmd.Stderr = os.Stderr
	testenv.Must(t, cmd.Start(), "start edge process")
	p := &edgeProc{cmd: cmd, addr: addr, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-p.done })
	testenv.Wait(t, 60*time.Second, "edge process to serve", func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return p
}

// killQueueSize is the edge's event_queue_size in the kill -9 test: small,
// so the loss has a hard bound however long a spool fsync stalls on a busy
// disk (one stalled past a second under a full test run, and the default
// queue of 65,536 then held over 3,000 answered calls' events).
const killQueueSize = 256

// killClients is how many clients call the edge in the kill -9 test.
const killClients = 16

// TestKill9WhileSpoolingLosesAtMostTheUnsyncedTail runs the real edge binary
// with Kafka unreachable, kills it with SIGKILL under load, and measures how
// many answered calls are missing from the spool: the loss bound. It then
// restarts the edge against Kafka and checks every spooled event arrives.
func TestKill9WhileSpoolingLosesAtMostTheUnsyncedTail(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "tollgate")
	build := exec.Command("go", "build", "-o", bin, "./cmd/tollgate")
	build.Dir = testenv.RepoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tollgate: %v\n%s", err, out)
	}
	env := edgetest.New(t)
	key, _ := env.Key(t, "acct_kill", edge.Secret, schemas.Live)
	env.SetPlan(t, "acct_kill", "unlimited", edge.Limits{RequestsPerSecond: 1_000_000, Burst: 1_000_000}, "")
	spool := filepath.Join(dir, "spool")

	p := startEdgeProc(t, bin, dir, env, "127.0.0.1:1", spool)
	var mu sync.Mutex
	accepted := map[string]bool{}
	var n atomic.Int64
	var killed atomic.Bool
	var wg sync.WaitGroup
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}, Timeout: 5 * time.Second}
	for w := 0; w < killClients; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !killed.Load() {
				req, _ := http.NewRequest("GET", "http://"+p.addr+"/v1/widgets/1", nil)
				req.Header.Set("Authorization", "Bearer "+key)
				resp, err := client.Do(req)
				if err != nil {
					return
				}
				resp.Body.Close()
				if resp.StatusCode == 200 {
					mu.Lock()
					accepted[resp.Header.Get(edge.HeaderRequestID)] = true
					mu.Unlock()
					n.Add(1)
				}
			}
		}()
	}
	testenv.Wait(t, 60*time.Second, "3000 calls answered", func() bool { return n.Load() >= 3000 })
	testenv.Must(t, p.cmd.Process.Signal(syscall.SIGKILL), "kill -9")
	<-p.done
	killed.Store(true)
	wg.Wait()

	// Read a copy, so the real spool is still whole for the restart below.
	scratch := filepath.Join(dir, "spool-copy")
	testenv.Must(t, os.CopyFS(scratch, os.DirFS(spool)), "copy spool")
	sp, err := edgekafka.OpenSpool(scratch, slog.New(slog.DiscardHandler), 0)
	testenv.Must(t, err, "open spool after kill -9")
	spooled := map[string]bool{}
	for {
		recs, cur, err := sp.Read(1000)
		testenv.Must(t, err, "read spool")
		if len(recs) == 0 {
			break
		}
		for _, r := range recs {
			ev, err := schemas.Decode(r, time.Now().Add(time.Hour))
			testenv.Must(t, err, "decode spooled event")
			spooled[ev.RequestID] = true
		}
		testenv.Must(t, sp.Commit(cur, len(recs)), "commit scratch cursor")
	}
	_ = sp.Close()
	lost := 0
	for id := range accepted {
		if !spooled[id] {
			lost++
		}
	}
	t.Logf("kill -9 while spooling: %d calls answered, %d events spooled, %d answered calls lost", len(accepted), len(spooled), lost)
	// The bound: events of answered calls not yet fsynced, i.e. the
	// in-memory queue, the batch being written (1,000) and, at most one
	// per client, calls answered whose event was still waiting to queue.
	// It usually loses a dozen or none (docs/edge.md).
	if bound := killQueueSize + 1000 + killClients; lost > bound {
		t.Fatalf("lost %d answered calls, more than the bound of %d", lost, bound)
	}

	// Restart against Kafka: everything spooled is delivered.
	p2 := startEdgeProc(t, bin, dir, env, env.Brokers[0], spool)
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, len(spooled), 60*time.Second)
	inTopic := map[string]int{}
	for _, ev := range evs {
		inTopic[ev.RequestID]++
	}
	for id := range spooled {
		if inTopic[id] != 1 {
			t.Fatalf("spooled event for %s is in the topic %d times, want 1", id, inTopic[id])
		}
	}
	testenv.Must(t, p2.cmd.Process.Signal(syscall.SIGTERM), "stop edge")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	select {
	case <-p2.done:
		if p2.err != nil {
			t.Fatalf("edge exited with %v after SIGTERM", p2.err)
		}
	case <-ctx.Done():
		t.Fatal("edge did not stop within 30s of SIGTERM")
	}
}
