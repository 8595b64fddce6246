package testenv

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Instance is a private copy of one backing service, started for a single
// test through the project's own script, on its own loopback ports and with
// its own data. Fault tests stop, restart and kill it without disturbing the
// shared services that other tests use at the same time.
type Instance struct {
	// Service is the script's name for it: kafka, clickhouse, postgres or redis.
	Service string
	// Addr is host:port of its client listener (for postgres, a URL).
	Addr string
	t    testing.TB
	env  []string
	mu   sync.Mutex
}

// PrivateKafka starts a single-node Kafka broker for this test.
func PrivateKafka(t testing.TB) *Instance {
	t.Helper()
	return startKafka(t)
}

// startKafka starts a private broker with its PLAINTEXT and controller
// listeners on free ports; env adds to the script's environment (the
// secure listener's settings, for PrivateSecureKafka).
func startKafka(t testing.TB, env ...string) *Instance {
	t.Helper()
	p, c := freePort(t), freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	return startInstance(t, "kafka", addr, append([]string{
		"TOLLGATE_KAFKA_BROKERS=" + addr,
		"TOLLGATE_KAFKA_CONTROLLER_PORT=" + strconv.Itoa(c),
		// A private broker serves one test: a small heap is plenty.
		"KAFKA_HEAP_OPTS=-Xmx384m -Xms128m"}, env...)...)
}

// PrivateClickHouse starts a ClickHouse server for this test.
func PrivateClickHouse(t testing.TB) *Instance {
	t.Helper()
	p, h := freePort(t), freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	return startInstance(t, "clickhouse", addr,
		"TOLLGATE_CLICKHOUSE_ADDR="+addr,
		"TOLLGATE_CLICKHOUSE_HTTP_PORT="+strconv.Itoa(h))
}

// PrivateRedis starts a Redis server for this test.
func PrivateRedis(t testing.TB) *Instance {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	return startInstance(t, "redis", addr, "TOLLGATE_REDIS_ADDR="+addr)
}

// PrivatePostgres starts a PostgreSQL server for this test; Addr is its URL.
func PrivatePostgres(t testing.TB) *Instance {
	t.Helper()
	url := fmt.Sprintf("postgres://tollgate@127.0.0.1:%d/tollgate?sslmode=disable", freePort(t))
	return startInstance(t, "postgres", url, "TOLLGATE_POSTGRES_URL="+url)
}

func startInstance(t testing.TB, service, addr string, env ...string) *Instance {
	t.Helper()
	shared := SharedStateDir(t)
	sweepOrphans(t)
	state, err := os.MkdirTemp("", "tollgate-"+service+"-")
	if err != nil {
		t.Fatalf("private %s: %v", service, err)
	}
	// Removed however the test ends; the instance's own stop is added below.
	t.Cleanup(func() { _ = os.RemoveAll(state) })
	// The test process that owns the instance, for sweepOrphans.
	if err := os.WriteFile(filepath.Join(state, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatalf("private %s: %v", service, err)
	}
	// Reuse what the shared services already installed, so a private
	// instance costs a start-up, not a download.
	if service == "kafka" {
		libs := filepath.Join(shared, "kafka", "libs")
		if _, err := os.Stat(filepath.Join(libs, ".pom-sha256")); err != nil {
			t.Fatalf("private kafka needs the broker jars in %s: %s", libs, howToStart)
		}
		if err := os.MkdirAll(filepath.Join(state, "kafka"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(libs, filepath.Join(state, "kafka", "libs")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(state, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.Symlink(filepath.Join(shared, "bin", "stripe-mock"), filepath.Join(state, "bin", "stripe-mock"))
	inst := &Instance{Service: service, Addr: addr, t: t, env: append([]string{"TOLLGATE_STATE_DIR=" + state}, env...)}
	t.Cleanup(func() {
		_, _ = inst.script("stop", service)
		if resolved, err := filepath.EvalSymlinks(filepath.Join(state, service)); err == nil && !strings.HasPrefix(resolved, state) {
			_ = os.RemoveAll(filepath.Dir(resolved))
		}
		_ = os.RemoveAll(state)
	})
	inst.Start()
	return inst
}

// ownerFile, in a private instance's state directory, holds the pid of the
// test process that started it.
const ownerFile = "owner.pid"

// sweepOrphans stops the private instances whose test process is gone and
// removes their state. A test binary that is killed, or hits go test's
// timeout, runs no cleanup: its instances ran on in sessions of their own
// (a Kafka broker holding hundreds of megabytes) until the next run swept
// them here. An instance whose owner still runs (a package tested beside
// this one) is left alone.
func sweepOrphans(t testing.TB) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "tollgate-*-*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue // not a private instance, or one being set up
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		service := strings.SplitN(strings.TrimPrefix(filepath.Base(dir), "tollgate-"), "-", 2)[0]
		// A pid file left by a process that is gone may name another
		// process by now (after a reboot, pids start over): such a file
		// is dropped, so that the stop below signals only the orphan.
		pidFiles, _ := filepath.Glob(filepath.Join(dir, "pids", "*.pid"))
		for _, f := range pidFiles {
			if !startedWhenWritten(f) {
				_ = os.Remove(f)
			}
		}
		orphan := &Instance{Service: service, t: t, env: []string{"TOLLGATE_STATE_DIR=" + dir}}
		if out, err := orphan.script("stop", service); err != nil {
			t.Logf("sweeping the private %s of a test process that is gone (%s): %v\n%s", service, dir, err, out)
			continue
		}
		if resolved, err := filepath.EvalSymlinks(filepath.Join(dir, service)); err == nil && !strings.HasPrefix(resolved, dir) {
			_ = os.RemoveAll(filepath.Dir(resolved))
		}
		_ = os.RemoveAll(dir)
	}
}

// startedWhenWritten reports whether the pid file names the process that
// wrote it. services.sh writes the process's start time (clock ticks after
// boot) next to its pid, just before the service's exec: a process that took
// the pid over since started at another time. A pid file with the pid alone
// is judged by its age: the process must have started by the time it was
// written, give or take clock ticks.
func startedWhenWritten(pidFile string) bool {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return false
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 || len(fields) > 2 {
		return false
	}
	ticks, err := startTicks(fields[0])
	if err != nil {
		return false
	}
	if len(fields) == 2 {
		return fields[1] == strconv.FormatInt(ticks, 10)
	}
	info, err := os.Stat(pidFile)
	if err != nil {
		return false
	}
	boot, err := bootTime()
	if err != nil {
		return false
	}
	const userHZ = 100 // Linux's clock ticks per second as /proc reports them
	started := boot.Add(time.Duration(ticks) * (time.Second / userHZ))
	return !started.After(info.ModTime().Add(5 * time.Second))
}

// startTicks is when process pid started, in clock ticks after boot: the
// 22nd field of its stat line, the 20th after the command name (which may
// hold spaces, in parentheses).
func startTicks(pid string) (int64, error) {
	stat, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%s/stat: %d fields after the name", pid, len(fields))
	}
	return strconv.ParseInt(fields[19], 10, 64)
}

// bootTime is when the machine booted (/proc/stat's btime).
func bootTime() (time.Time, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			sec, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return time.Unix(sec, 0), err
		}
	}
	return time.Time{}, fmt.Errorf("no btime in /proc/stat")
}

// Start starts the instance (again) and waits until it serves.
func (i *Instance) Start() {
	i.t.Helper()
	if out, err := i.script("start", i.Service); err != nil {
		i.t.Fatalf("start private %s on %s: %v\n%s", i.Service, i.Addr, err, out)
	}
}

// Stop stops the instance gracefully.
func (i *Instance) Stop() {
	i.t.Helper()
	if out, err := i.script("stop", i.Service); err != nil {
		i.t.Fatalf("stop private %s: %v\n%s", i.Service, err, out)
	}
}

// Kill9 sends SIGKILL to the instance and its process group.
func (i *Instance) Kill9() {
	i.t.Helper()
	if out, err := i.script("kill9", i.Service); err != nil {
		i.t.Fatalf("kill -9 private %s: %v\n%s", i.Service, err, out)
	}
}

func (i *Instance) script(args ...string) (string, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	cmd := exec.Command(filepath.Join(RepoRoot(i.t), "deploy", "local", "services.sh"), args...)
	cmd.Env = append(os.Environ(), i.env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return "", err
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(3 * time.Minute):
		_ = cmd.Process.Kill()
		return out.String(), fmt.Errorf("services.sh %s: timed out", strings.Join(args, " "))
	}
}

// RepoRoot is the directory holding go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// SharedStateDir is where the shared services keep their state.
func SharedStateDir(t testing.TB) string {
	if d := os.Getenv("TOLLGATE_STATE_DIR"); d != "" {
		return d
	}
	return filepath.Join(RepoRoot(t), ".run")
}

// freePort is a port free now, below the kernel's ephemeral range (32768
// and up on Linux). A private instance is often stopped and started again
// on the same port; a port from the ephemeral range can meanwhile be taken
// by any outbound connection on the machine (the test's own calls
// included), and the restart then fails, as a Kafka restart did once after
// a test's 10,000 calls.
func freePort(t testing.TB) int {
	t.Helper()
	for range 200 {
		p := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l.Close()
		return p
	}
	t.Fatal("free port: none free in 20000-31999 after 200 tries")
	return 0
}

// ChildEnv is this process's environment without any TOLLGATE_ variable,
// for a tollgate process a test starts with its own configuration file:
// environment variables override the file, and the ones `make test` exports
// point at the shared services.
func ChildEnv(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TOLLGATE_") {
			out = append(out, kv)
		}
	}
	return append(out, extra...)
}
