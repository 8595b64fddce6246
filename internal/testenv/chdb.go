package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// ClickHouseHTTPURL is the HTTP interface of the ClickHouse at
// ClickHouseAddr (TOLLGATE_CLICKHOUSE_HTTP_PORT, default 18123).
func ClickHouseHTTPURL() string {
	host, _, err := net.SplitHostPort(ClickHouseAddr())
	if err != nil {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, env("TOLLGATE_CLICKHOUSE_HTTP_PORT", "18123"))
}

// ChdbPython is a Python interpreter that can import chdb, ClickHouse's
// engine embedded in a Python package (TOLLGATE_CHDB_PYTHON, default the
// virtualenv deploy/local/services.sh installs in the state directory). It
// fails the test, saying how to install it, when there is none.
func ChdbPython(t testing.TB) string {
	t.Helper()
	p := os.Getenv("TOLLGATE_CHDB_PYTHON")
	if p == "" {
		p = filepath.Join(SharedStateDir(t), "chdb", "bin", "python")
	}
	if out, err := exec.Command(p, "-c", "import chdb").CombinedOutput(); err != nil {
		t.Fatalf("chdb is not importable by %s: %v %s\nthis test needs it: install it with `make services` (deploy/local/services.sh install)",
			p, err, strings.TrimSpace(string(out)))
	}
	return p
}
