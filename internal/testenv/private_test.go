package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestPrivateInstanceSurvivesStopStartAndKill9(t *testing.T) {
	inst := PrivateRedis(t)
	if inst.Addr == RedisAddr() {
		t.Fatalf("private instance shares the shared address %s", inst.Addr)
	}
	ping := pinger(t, inst.Addr)
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer: %v", err)
	}
	inst.Stop()
	if err := ping(); err == nil {
		t.Fatal("private redis still answers after Stop")
	}
	inst.Start()
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer after Start: %v", err)
	}
	inst.Kill9()
	if err := ping(); err == nil {
		t.Fatal("private redis still answers after Kill9")
	}
	inst.Start()
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer after restart: %v", err)
	}
	// The shared instance was never touched.
	shared := redis.NewClient(&redis.Options{Addr: RedisAddr()})
	defer shared.Close()
	if err := shared.Ping(context.Background()).Err(); err != nil {
		Unreachable(t, "Redis", RedisAddr(), err)
	}
}

func TestAPrivateInstanceWhoseTestIsGoneIsSweptAtTheNextStart(t *testing.T) {
	inst := PrivateRedis(t)
	state := strings.TrimPrefix(inst.env[0], "TOLLGATE_STATE_DIR=")
	ping := pinger(t, inst.Addr)
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer: %v", err)
	}
	// Owned by this process, it is left alone.
	sweepOrphans(t)
	if err := ping(); err != nil {
		t.Fatalf("a private redis whose test still runs was swept: %v", err)
	}
	// Owned by a process that has exited, as a killed test binary's are.
	gone := exec.Command("true")
	Must(t, gone.Run(), "run a process that exits")
	Must(t, os.WriteFile(filepath.Join(state, ownerFile), []byte(strconv.Itoa(gone.Process.Pid)), 0o644), "write owner")
	sweepOrphans(t)
	if err := ping(); err == nil {
		t.Fatal("the private redis of a test process that is gone still answers after a sweep")
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("its state %s is still there (%v)", state, err)
	}
}

func TestAPidFileIsBelievedOnlyForTheProcessThatWroteIt(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "x.pid")
	// This process started before the file was written: it is the one.
	Must(t, os.WriteFile(f, []byte(strconv.Itoa(os.Getpid())), 0o644), "write")
	if !startedWhenWritten(f) {
		t.Fatal("a pid file written after its process started is not believed")
	}
	// Written long before this process started, as a pid file left from
	// before a reboot names whichever process has the pid now.
	Must(t, os.Chtimes(f, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour)), "age the file")
	if startedWhenWritten(f) {
		t.Fatal("a pid file an hour older than the process it names is believed")
	}
	Must(t, os.WriteFile(f, []byte("999999999"), 0o644), "write")
	if startedWhenWritten(f) {
		t.Fatal("a pid file naming no process is believed")
	}
	// With the start time, as services.sh writes it: believed whatever the
	// file's age (a clock step moves the age, not the start time), and
	// only for a process that started then.
	ticks, err := startTicks(strconv.Itoa(os.Getpid()))
	Must(t, err, "this process's start time")
	Must(t, os.WriteFile(f, fmt.Appendf(nil, "%d %d\n", os.Getpid(), ticks), 0o644), "write")
	Must(t, os.Chtimes(f, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour)), "age the file")
	if !startedWhenWritten(f) {
		t.Fatal("a pid file with its process's start time is not believed once it is an hour old")
	}
	Must(t, os.WriteFile(f, fmt.Appendf(nil, "%d %d\n", os.Getpid(), ticks+1), 0o644), "write")
	if startedWhenWritten(f) {
		t.Fatal("a pid file whose start time is not its process's is believed")
	}
}

// pinger asks the Redis at addr for a PING, once per call, without retries.
func pinger(t *testing.T, addr string) func() error {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	t.Cleanup(func() { _ = c.Close() })
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return c.Ping(ctx).Err()
	}
}
