package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"
)

// ReportLastMonth sends n server-reported events per key for the last
// hours of the month before now, through the edge's POST /v1/events, so the
// invoicer has a closed period to invoice. Ids and times are derived from
// the month, so a rerun reports the same events again and they count once.
func ReportLastMonth(ctx context.Context, edge string, keys []string, now time.Time, n int) (int, error) {
	// The month is UTC's, as the demo accounts' are: a local clock west of
	// UTC would otherwise put the events a month early on the last evening
	// of a month.
	now = now.UTC()
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
		accepted, err := postEvents(ctx, edge, key, body)
		if err != nil {
			return total, err
		}
		total += accepted
	}
	return total, nil
}

// reportAttempts bounds how often one batch is sent while the edge answers
// 429: the demo's own calls may have used the key's rate just before.
const reportAttempts = 10

// postEvents sends one batch and returns how many events the edge
// accepted. A 429 (the demo's calls spent the key's or the account's rate)
// is sent again after its Retry-After, at most a few seconds each time.
func postEvents(ctx context.Context, edge, key string, body []byte) (int, error) {
	for attempt := 1; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, edge+"/v1/events", bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, fmt.Errorf("report events: %w", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusTooManyRequests && attempt < reportAttempts {
			wait := time.Second
			if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
				wait = min(time.Duration(secs)*time.Second, 5*time.Second)
			}
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(wait):
			}
			continue
		}
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("report events: status %d: %s", resp.StatusCode, b)
		}
		var res struct {
			Accepted int `json:"accepted"`
		}
		if err := json.Unmarshal(b, &res); err != nil {
			return 0, fmt.Errorf("report events: %w", err)
		}
		return res.Accepted, nil
	}
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
// least one invoice and, when synced is set (a Stripe account or
// stripe-mock is configured), until none is still waiting for its Stripe
// sync. If the sync is still pending when timeout passes, the invoices are
// returned as they stand; with none at all it is an error.
func WaitForInvoices(ctx context.Context, api, key string, timeout time.Duration, synced bool) ([]Invoice, error) {
	deadline := time.Now().Add(timeout)
	var last []Invoice
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
				last = list.Data
				if !synced || !slices.ContainsFunc(last, unsynced) {
					return last, nil
				}
			}
		}
		if time.Now().After(deadline) {
			if len(last) > 0 {
				return last, nil
			}
			return nil, fmt.Errorf("no invoice after %s (last error: %v)", timeout, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// unsynced is an invoice the ledger holds that Stripe has not taken yet.
func unsynced(inv Invoice) bool { return inv.Status == "draft" || inv.Status == "finalized" }
