// Package demo is a small stand-in for an operator's API and a traffic
// generator, so one machine can show the whole pipeline working.
package demo

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
)

// Upstream is a tiny JSON API with read and write routes. It echoes what it
// received so tests can check the edge forwarded the call faithfully.
type Upstream struct {
	calls atomic.Int64
}

// Calls is how many requests the upstream has served.
func (u *Upstream) Calls() int64 { return u.calls.Load() }

// Echo is the body the upstream answers with.
type Echo struct {
	Method  string              `json:"method"`
	Path    string              `json:"path"`
	Query   string              `json:"query"`
	Headers map[string][]string `json:"headers"`
	Body    string              `json:"body"`
}

func (u *Upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u.calls.Add(1)
	if code := r.URL.Query().Get("status"); code != "" {
		if n, err := strconv.Atoi(code); err == nil && n >= 200 && n <= 599 {
			w.WriteHeader(n)
			return
		}
	}
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	w.Header().Set("Content-Type", "application/json")
	if strings.HasPrefix(r.URL.Path, "/healthz") {
		_, _ = w.Write([]byte(`{"ok":true}`))
		return
	}
	_ = json.NewEncoder(w).Encode(Echo{
		Method:  r.Method,
		Path:    r.URL.Path,
		Query:   r.URL.RawQuery,
		Headers: r.Header,
		Body:    string(body),
	})
}
