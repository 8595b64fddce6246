// Package gctune sets Tollgate's default for the Go garbage collector.
//
// Every Tollgate process keeps a small live heap (bounded queues, caches
// and batches) and allocates quickly per call or per event, so at Go's
// default (GOGC=100) it collects many times a second and spends a large
// share of its CPU, and of its tail latency, on marking. Letting the heap
// grow to five times the live data (GOGC=400) trades tens of megabytes
// for that CPU. An operator's GOGC, or GOMEMLIMIT for a hard ceiling, is
// always respected.
package gctune

import (
	"os"
	"runtime/debug"
)

// Percent is the GOGC Tollgate uses when the environment sets none.
const Percent = 400

// Apply sets Percent unless GOGC is set, and returns the GOGC in effect.
func Apply() int {
	if v, ok := os.LookupEnv("GOGC"); ok && v != "" {
		p := debug.SetGCPercent(-1)
		debug.SetGCPercent(p)
		return p
	}
	debug.SetGCPercent(Percent)
	return Percent
}
