package aggregator

import "testing"

// A page without a limit has the default size, but never more than
// aggregator.max_page_size: with a smaller maximum, a page without a limit
// had 100 rows (50 of the request log) all the same. A limit over the
// maximum is served as the maximum: refused, the dashboard (which asks for
// 1,000 rows a page) failed on every refresh under a smaller one.
func TestADefaultPageIsNoLargerThanTheMaximum(t *testing.T) {
	s := &Server{cfg: Config{MaxPageSize: 20}}
	for _, c := range []struct {
		v         string
		def, want int
	}{{"", 100, 20}, {"", 50, 20}, {"7", 100, 7}, {"20", 100, 20}, {"21", 100, 20}, {"1000", 100, 20}} {
		if got, err := s.limit(c.v, c.def); err != nil || got != c.want {
			t.Errorf("limit %q (default %d): %d, %v; want %d", c.v, c.def, got, err, c.want)
		}
	}
	for _, v := range []string{"0", "-1", "x", "1.5"} {
		if _, err := s.limit(v, 100); err == nil {
			t.Errorf("limit %q was taken", v)
		}
	}
}
