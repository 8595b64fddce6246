// Package memprof writes the benchmarks' heap allocation profiles.
package memprof

import (
	"fmt"
	"os"
	"runtime/pprof"
)

// WriteAllocs writes this process's heap allocation profile (every
// allocation since it started) to path, for go tool pprof.
func WriteAllocs(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("memory profile: %w", err)
	}
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("memory profile: %w", err)
	}
	return f.Close()
}
