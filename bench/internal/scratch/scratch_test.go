package scratch

import "testing"

// The scratch database replaces the one the connection string names,
// whatever its form: a URL without a query string was left as it was, and
// a benchmark wrote to the operator's own database.
func TestURLNamesTheScratchDatabase(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable", "postgres://tollgate@127.0.0.1:15432/bench_x?sslmode=disable"},
		{"postgres://u:pw@host:5432/tollgate", "postgres://u:pw@host:5432/bench_x"},
		{"postgresql://host/tollgate?dbname=other&sslmode=disable", "postgresql://host/bench_x?sslmode=disable"},
		{"postgres://host", "postgres://host/bench_x"},
		{"host=127.0.0.1 dbname=tollgate", "host=127.0.0.1 dbname=tollgate dbname=bench_x"},
	} {
		got, err := URL(c.in, "bench_x")
		if err != nil || got != c.want {
			t.Errorf("URL(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
}
