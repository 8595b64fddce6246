package gctune

import (
	"runtime/debug"
	"testing"
)

func TestApplySetsTheDefaultOnlyWithoutGOGC(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "")
	if got := Apply(); got != Percent || current() != Percent {
		t.Fatalf("without GOGC: Apply = %d, runtime = %d, want %d", got, current(), Percent)
	}
	debug.SetGCPercent(150) // what the runtime would have read from GOGC=150 at start
	t.Setenv("GOGC", "150")
	if got := Apply(); got != 150 || current() != 150 {
		t.Fatalf("with GOGC=150: Apply = %d, runtime = %d, want 150 left alone", got, current())
	}
}

func current() int {
	p := debug.SetGCPercent(-1)
	debug.SetGCPercent(p)
	return p
}
