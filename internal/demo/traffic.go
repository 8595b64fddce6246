package demo

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Sent summarises a traffic run.
type Sent struct {
	Total      int
	OK         int
	RequestIDs []string
}

var routes = []struct{ method, path, body string }{
	{"GET", "/v1/widgets", ""},
	{"GET", "/v1/widgets/42", ""},
	{"POST", "/v1/widgets", `{"name":"demo"}`},
	{"GET", "/v1/reports?range=7d", ""},
	{"DELETE", "/v1/widgets/7", ""},
}

// The demo accounts are on the growth plan: 100 calls a second, bursts of
// 200, per key and per account (one key each). The demo's traffic stays
// under that, so every call it sends is proxied and metered: a refused
// call is no usage event, and the demo counts its calls in ClickHouse.
const (
	perKeyRate  = 80
	perKeyBurst = 150
)

// Traffic sends n calls to the edge at base, spread over keys and routes,
// four at a time and under the demo plan's rate, and returns what came
// back.
func Traffic(ctx context.Context, base string, keys []string, n int) (Sent, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	pace := rate.NewLimiter(rate.Limit(perKeyRate*len(keys)), perKeyBurst*len(keys))
	var mu sync.Mutex
	var s Sent
	var firstErr error
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				r := routes[i%len(routes)]
				var body io.Reader
				if r.body != "" {
					body = strings.NewReader(r.body)
				}
				req, err := http.NewRequestWithContext(ctx, r.method, base+r.path, body)
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
					continue
				}
				req.Header.Set("Authorization", "Bearer "+keys[i%len(keys)])
				resp, err := client.Do(req)
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("demo call %s %s: %w", r.method, r.path, err)
					}
					mu.Unlock()
					continue
				}
				s.Total++
				if resp.StatusCode < 300 {
					s.OK++
				}
				s.RequestIDs = append(s.RequestIDs, resp.Header.Get("Request-Id"))
				mu.Unlock()
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	for i := 0; i < n && pace.Wait(ctx) == nil; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	return s, firstErr
}
