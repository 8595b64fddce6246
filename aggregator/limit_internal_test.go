package aggregator

import "testing"

// A page without a limit has the default size, but never more than
// aggregator.max_page_size: with a smaller maximum, a page without a limit
// had 100 rows (50 of the request log) all the same.
func TestADefaultPageIsNoLargerThanTheMaximum(t *testing.T) {
	s := &Server{cfg: Config{MaxPageSize: 20}}
	for _, c := range []struct {
		v         string
		def, want int
	}{{"", 100, 20}, {"", 50, 20}, {"7", 100, 7}, {"20", 100, 20}} {
		if got, err := s.limit(c.v, c.def); err != nil || got != c.want {
			t.Errorf("limit %q (default %d): %d, %v; want %d", c.v, c.def, got, err, c.want)
		}
	}
	if _, err := s.limit("21", 100); err == nil {
		t.Error("a limit over the maximum was taken")
	}
}
