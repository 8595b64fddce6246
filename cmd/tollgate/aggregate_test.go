package main

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

// TestTheAggregatorKeepsMetricsOffTheUsageAPI starts the aggregator with a
// metrics listener: /metrics answers there, and the usage API's listener,
// which API consumers and their browsers reach, answers it 404.
func TestTheAggregatorKeepsMetricsOffTheUsageAPI(t *testing.T) {
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	cfg := testConfig(t, pg, ch, "unused")
	cfg.Aggregator.MetricsListen = "127.0.0.1:0"
	ctx, cancel := context.WithCancel(context.Background())
	m, err := NewAggregateMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "start the aggregator")
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	defer func() {
		cancel()
		<-done
		_ = m.Close()
	}()

	get := func(url string) (int, string) {
		t.Helper()
		var last error
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			resp, err := http.Get(url)
			if err != nil {
				last = err
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			return resp.StatusCode, string(b)
		}
		t.Fatalf("GET %s: %v", url, last)
		return 0, ""
	}
	if m.MetricsAddr() == "" {
		t.Fatal("no metrics listener although aggregator.metrics_listen is set")
	}
	status, body := get("http://" + m.MetricsAddr() + "/metrics")
	if status != http.StatusOK || !strings.Contains(body, "go_goroutines") {
		t.Errorf("metrics listener /metrics: %d %.200q, want 200 with the process's metrics", status, body)
	}
	status, body = get("http://" + m.Addr() + "/metrics")
	if status != http.StatusNotFound || strings.Contains(body, "go_goroutines") {
		t.Errorf("usage API /metrics: %d %.200q, want 404 without metrics", status, body)
	}
	if status, _ := get("http://" + m.Addr() + "/healthz"); status != http.StatusOK {
		t.Errorf("usage API /healthz: %d, want 200", status)
	}
}
