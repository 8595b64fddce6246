package demo

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func TestLastMonthIsUTCsWhateverTheLocalZone(t *testing.T) {
	var times []time.Time
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b struct {
			Events []struct {
				Time time.Time `json:"time"`
			} `json:"events"`
		}
		if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
			t.Errorf("decode: %v", err)
		}
		for _, e := range b.Events {
			times = append(times, e.Time)
		}
		_ = json.NewEncoder(w).Encode(map[string]int{"accepted": len(b.Events)})
	}))
	defer srv.Close()
	la, err := time.LoadLocation("America/Los_Angeles")
	if err != nil {
		t.Fatal(err)
	}
	// 17:00 on 30 November in Los Angeles is already 1 December in UTC.
	now := time.Date(2026, 11, 30, 17, 0, 0, 0, la)
	n, err := ReportLastMonth(context.Background(), srv.URL, []string{"k"}, now, 5)
	if err != nil || n != 5 {
		t.Fatalf("reported %d, err %v", n, err)
	}
	from, to := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	for _, at := range times {
		if at.Before(from) || !at.Before(to) {
			t.Errorf("event at %s, want within November UTC", at.UTC())
		}
	}
}

func TestWaitForInvoicesWaitsForTheStripeSync(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		status := "finalized"
		if calls.Add(1) > 1 {
			status = "open"
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"data": []map[string]any{{"id": "inv_1", "status": status}}})
	}))
	defer srv.Close()
	ctx := context.Background()
	invs, err := WaitForInvoices(ctx, srv.URL, "k", 10*time.Second, false)
	if err != nil || len(invs) != 1 || invs[0].Status != "finalized" {
		t.Fatalf("without a Stripe account: %+v, %v; want the finalized invoice at once", invs, err)
	}
	calls.Store(0) // finalized again first, then synced
	invs, err = WaitForInvoices(ctx, srv.URL, "k", 10*time.Second, true)
	if err != nil || len(invs) != 1 || invs[0].Status != "open" {
		t.Fatalf("with a Stripe account: %+v, %v; want the synced invoice", invs, err)
	}
	if calls.Load() != 2 {
		t.Fatalf("with a Stripe account: %d polls, want 2 (finalized, then open)", calls.Load())
	}
}

// The demo's own calls may spend the key's rate just before it reports
// last month's events: a 429 is sent again after its Retry-After, where it
// ended the demo before.
func TestAReportRefusedForItsRateIsSentAgain(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = w.Write([]byte(`{"error":{"type":"rate_limit_error","code":"rate_limited"}}`))
			return
		}
		var b struct {
			Events []json.RawMessage `json:"events"`
		}
		if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
			t.Errorf("decode: %v", err)
		}
		_ = json.NewEncoder(w).Encode(map[string]int{"accepted": len(b.Events)})
	}))
	defer srv.Close()
	n, err := ReportLastMonth(context.Background(), srv.URL, []string{"k"}, time.Now(), 3)
	if err != nil || n != 3 {
		t.Fatalf("reported %d, err %v; want 3 after one 429", n, err)
	}
	if got := calls.Load(); got != 2 {
		t.Errorf("%d requests, want 2 (one refused, one sent again)", got)
	}
}

// A key that stays refused ends the report with the edge's answer after a
// bounded number of attempts.
func TestAReportRefusedEveryTimeEnds(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Retry-After", "0")
		w.WriteHeader(http.StatusTooManyRequests)
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := ReportLastMonth(ctx, srv.URL, []string{"k"}, time.Now(), 1); err == nil {
		t.Fatal("a report refused every time succeeded")
	}
	if got := calls.Load(); got != reportAttempts {
		t.Errorf("%d requests, want %d", got, reportAttempts)
	}
}
