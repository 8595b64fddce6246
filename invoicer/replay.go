package invoicer

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// AuditResult compares one ledger invoice with its recomputation.
type AuditResult struct {
	InvoiceID    string    `json:"invoice_id"`
	AccountID    string    `json:"account_id"`
	PeriodStart  time.Time `json:"period_start"`
	PeriodEnd    time.Time `json:"period_end"`
	Currency     string    `json:"currency"`
	LedgerTotal  int64     `json:"ledger_total"`
	ReplayTotal  int64     `json:"replay_total"`
	LedgerEvents int64     `json:"ledger_events"`
	ReplayEvents int64     `json:"replay_events"`
	LedgerHash   string    `json:"ledger_hash"`
	ReplayHash   string    `json:"replay_hash"`
	// Match is true when the recomputed fingerprint hash equals the
	// ledger's: same events counted, same quantities, same amounts.
	Match       bool     `json:"match"`
	Differences []string `json:"differences,omitempty"`
}

// Audit recomputes each ledger invoice from usage (a scratch database
// rebuilt from the raw event log) under the plan versions the ledger
// recorded for each segment, and compares. Invoices with one segment are
// read together, one query per period and meter.
func (iv *Invoicer) Audit(ctx context.Context, usage UsageReader, invs []StoredInvoice, progress func(done, total int)) ([]AuditResult, error) {
	byPeriod := map[Period][]string{}
	for _, si := range invs {
		if len(si.Fingerprint.Segments) == 1 {
			byPeriod[si.Period] = append(byPeriod[si.Period], si.AccountID)
		}
	}
	whole := map[Period]map[string]AccountUsage{}
	for p, accts := range byPeriod {
		u, err := usage.Usage(ctx, accts, p, iv.meters, schemas.Live)
		if err != nil {
			return nil, err
		}
		whole[p] = u
	}
	out := make([]AuditResult, 0, len(invs))
	for i, si := range invs {
		in := Inputs{AccountID: si.AccountID, Currency: si.Currency, Period: si.Period, Watermark: si.Fingerprint.Watermark}
		for _, s := range si.Fingerprint.Segments {
			pl, err := iv.store.Plan(ctx, s.PlanID, s.PlanVersion)
			if err != nil {
				return nil, fmt.Errorf("invoice %s: %w", si.ID, err)
			}
			in.Segments = append(in.Segments, Segment{Period: s.Period, Plan: pl})
			if len(si.Fingerprint.Segments) == 1 {
				u := whole[si.Period][si.AccountID]
				in.EventCount, in.Usage = u.Events, []map[string]int64{orEmpty(u.Quantities)}
				continue
			}
			m, err := usage.Usage(ctx, []string{si.AccountID}, s.Period, iv.meters, schemas.Live)
			if err != nil {
				return nil, err
			}
			in.EventCount += m[si.AccountID].Events
			in.Usage = append(in.Usage, orEmpty(m[si.AccountID].Quantities))
		}
		re, err := Compute(in)
		if err != nil {
			return nil, fmt.Errorf("recompute invoice %s: %w", si.ID, err)
		}
		r := AuditResult{InvoiceID: si.ID, AccountID: si.AccountID, PeriodStart: si.Period.Start, PeriodEnd: si.Period.End,
			Currency: si.Currency, LedgerTotal: si.Total, ReplayTotal: re.Total,
			LedgerEvents: si.Fingerprint.EventCount, ReplayEvents: re.Fingerprint.EventCount,
			LedgerHash: si.Fingerprint.Hash, ReplayHash: re.Fingerprint.Hash}
		r.Differences = diff(si.Invoice, re)
		r.Match = r.LedgerHash == r.ReplayHash && len(r.Differences) == 0
		out = append(out, r)
		if progress != nil {
			progress(i+1, len(invs))
		}
	}
	return out, nil
}

// diff names what differs between the ledger's invoice and a recomputation.
func diff(ledger, re Invoice) []string {
	var d []string
	if ledger.Fingerprint.EventCount != re.Fingerprint.EventCount {
		d = append(d, fmt.Sprintf("event_count: ledger %d, replay %d", ledger.Fingerprint.EventCount, re.Fingerprint.EventCount))
	}
	for i := range min(len(ledger.Fingerprint.Segments), len(re.Fingerprint.Segments)) {
		a, b := ledger.Fingerprint.Segments[i].Quantities, re.Fingerprint.Segments[i].Quantities
		keys := map[string]bool{}
		for k := range a {
			keys[k] = true
		}
		for k := range b {
			keys[k] = true
		}
		names := make([]string, 0, len(keys))
		for k := range keys {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			if a[k] != b[k] {
				d = append(d, fmt.Sprintf("segment %d %s: ledger %d, replay %d", i+1, k, a[k], b[k]))
			}
		}
	}
	if len(ledger.Lines) != len(re.Lines) {
		d = append(d, fmt.Sprintf("lines: ledger %d, replay %d", len(ledger.Lines), len(re.Lines)))
	} else {
		for i := range ledger.Lines {
			if ledger.Lines[i].Amount != re.Lines[i].Amount {
				d = append(d, fmt.Sprintf("line %d (%s): ledger %d, replay %d", i+1, ledger.Lines[i].PriceKey, ledger.Lines[i].Amount, re.Lines[i].Amount))
			}
		}
	}
	if ledger.Total != re.Total {
		d = append(d, fmt.Sprintf("total: ledger %d, replay %d", ledger.Total, re.Total))
	}
	if ledger.Fingerprint.Hash != re.Fingerprint.Hash && len(d) == 0 {
		d = append(d, "fingerprint hash differs")
	}
	return d
}
