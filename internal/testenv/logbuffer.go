package testenv

import (
	"bytes"
	"strings"
	"sync"
)

// LogBuffer collects a logger's lines, written from any goroutine, for a
// test to look at.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is everything written so far.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Contains reports whether s was written.
func (b *LogBuffer) Contains(s string) bool { return strings.Contains(b.String(), s) }
