package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"
)

// ReportLastMonth sends n server-reported events per key for the last
// hours of the month before now, through the edge's POST /v1/events, so the
// invoicer has a closed period to invoice. Ids and times are derived from
// the month, so a rerun reports the same events again and they count once.
func ReportLastMonth(ctx context.Context, edge string, keys []string, now time.Time, n int) (int, error) {
	monthStart := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	total := 0
	for ki, key := range keys {
		type item struct {
			ID    string    `json:"id"`
			Type  string    `json:"type"`
			Time  time.Time `json:"time"`
			Units int64     `json:"units"`
		}
		var batch struct {
			Events []item `json:"events"`
		}
		for i := 0; i < n; i++ {
			batch.Events = append(batch.Events, item{
				ID:    fmt.Sprintf("demo-%s-%d-%d", monthStart.Format("2006-01"), ki, i),
				Type:  "api_call",
				Time:  monthStart.Add(-time.Duration(i+1) * 7 * time.Minute),
				Units: 1,
			})
		}
		body, err := json.Marshal(batch)
		if err != nil {
			return total, err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, edge+"/v1/events", bytes.NewReader(body))
		if err != nil {
			return total, err
		}
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return total, fmt.Errorf("report events: %w", err)
		}
		var res struct {
			Accepted int `json:"accepted"`
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return total, fmt.Errorf("report events: status %d: %s", resp.StatusCode, b)
		}
		if err := json.Unmarshal(b, &res); err != nil {
			return total, fmt.Errorf("report events: %w", err)
		}
		total += res.Accepted
	}
	return total, nil
}

// Invoice is what the demo prints of a past invoice.
type Invoice struct {
	ID     string `json:"id"`
	Period struct {
		Start time.Time `json:"start"`
		End   time.Time `json:"end"`
	} `json:"period"`
	Status    string `json:"status"`
	Total     int64  `json:"total"`
	Currency  string `json:"currency"`
	HostedURL string `json:"hosted_invoice_url"`
}

// WaitForInvoices polls the invoice API until the key's account has at
// least one invoice, or timeout passes.
func WaitForInvoices(ctx context.Context, api, key string, timeout time.Duration) ([]Invoice, error) {
	deadline := time.Now().Add(timeout)
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, api+"/v1/invoices", nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			var list struct {
				Data []Invoice `json:"data"`
			}
			err = json.NewDecoder(resp.Body).Decode(&list)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusOK && len(list.Data) > 0 {
				return list.Data, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no invoice after %s (last error: %v)", timeout, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
