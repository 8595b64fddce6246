package procstat

import (
	"crypto/sha256"
	"net"
	"os"
	"slices"
	"testing"
	"time"
)

func TestListenerPIDsFindsThisProcess(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pids, err := ListenerPIDs(ln.Addr().(*net.TCPAddr).Port)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(pids, os.Getpid()) {
		t.Fatalf("listener pids %v, want this process (%d) among them", pids, os.Getpid())
	}
}

func TestListenerPIDsReportsAPortNobodyListensOn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	if pids, err := ListenerPIDs(port); err == nil {
		t.Fatalf("closed port %d: got pids %v, want an error", port, pids)
	}
}

func TestCPUGrowsWithWorkAndAgreesWithRusage(t *testing.T) {
	before, err := CPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	self0 := Self()
	// Burn at least 100 ms of CPU: ten clock ticks, well above /proc's
	// resolution.
	sum := sha256.Sum256(nil)
	for Self()-self0 < 100*time.Millisecond {
		for range 1000 {
			sum = sha256.Sum256(sum[:])
		}
	}
	after, err := CPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	burned := Self() - self0
	got := after - before
	// /proc counts in 10 ms ticks, and the two clocks are read at slightly
	// different moments.
	if got < burned-30*time.Millisecond || got > burned+30*time.Millisecond {
		t.Fatalf("/proc says %v of CPU, getrusage %v", got, burned)
	}
}

func TestASpanCountsThisProcessAndTheWatchedOnes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var m Meter
	if err := m.Watch("me", ln.Addr().String()); err != nil {
		t.Fatal(err)
	}
	span := m.Begin()
	self0 := Self()
	sum := sha256.Sum256(nil)
	for Self()-self0 < 100*time.Millisecond {
		for range 1000 {
			sum = sha256.Sum256(sum[:])
		}
	}
	self, others := span.End()
	if self < 100*time.Millisecond {
		t.Fatalf("this process used %v in the span, want at least 100ms", self)
	}
	// "me" is this process too, read through /proc in 10 ms ticks.
	if len(others) != 1 || others[0].Name != "me" || others[0].CPU < self-30*time.Millisecond || others[0].CPU > self+30*time.Millisecond {
		t.Fatalf("watched: %+v, want one entry \"me\" within 30ms of %v", others, self)
	}
	var none *Meter
	if _, others := none.Begin().End(); len(others) != 0 {
		t.Fatalf("a nil meter reported %+v", others)
	}
}
