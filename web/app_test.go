package web

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

// TestDashboardScript runs the dashboard's script under Node.js against a
// fake usage API (testdata/app_test.js), one subtest per case it reports.
func TestDashboardScript(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node not found on PATH: the dashboard's script (static/app.js) is tested with Node.js 18 or later; install it (apt-get install nodejs) and run the test again")
	}
	var out bytes.Buffer
	cmd := exec.Command(node, "testdata/app_test.js", "static/app.js")
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	cases := 0
	sc := bufio.NewScanner(bytes.NewReader(out.Bytes()))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "ok "):
			cases++
			t.Run(strings.TrimPrefix(line, "ok "), func(t *testing.T) {})
		case strings.HasPrefix(line, "FAIL "):
			cases++
			name, why, _ := strings.Cut(strings.TrimPrefix(line, "FAIL "), ": ")
			t.Run(name, func(t *testing.T) { t.Fatal(why) })
		}
	}
	if runErr != nil && !t.Failed() {
		t.Fatalf("node testdata/app_test.js: %v\n%s", runErr, out.String())
	}
	if cases == 0 {
		t.Fatalf("node testdata/app_test.js reported no cases:\n%s", out.String())
	}
}
