package edge

import (
	"strconv"
	"testing"
)

// TestLimitNamesNeedNoEscaping: the rate-limit headers quote limit names
// without escaping them, which holds only while every name is plain.
func TestLimitNamesNeedNoEscaping(t *testing.T) {
	for _, name := range append(limitNames[:], "monthly") {
		if got, want := string(appendName(nil, name)), strconv.Quote(name); got != want {
			t.Errorf("limit name %q is written %s, want %s", name, got, want)
		}
	}
}
