package invoicer

import (
	"context"
	"fmt"
	"sort"
	"strings"
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
	// Match is true when the result is ResultMatch: the recomputed
	// fingerprint hash equals the ledger's (same events counted, same
	// quantities, same amounts), from the log with or without the events
	// that arrived after the close alike.
	Match bool `json:"match"`
	// Result is ResultMatch, ResultMatchAtClose or ResultDifferent.
	Result string `json:"result"`
	// ArrivedAfterClose counts the period's events that reached the log
	// after the invoice was closed; UnbilledTotal is what they would have
	// added.
	ArrivedAfterClose int64    `json:"arrived_after_close,omitempty"`
	UnbilledTotal     int64    `json:"unbilled_total,omitempty"`
	Differences       []string `json:"differences,omitempty"`
}

// Audit results.
const (
	// ResultMatch: the whole log recomputes the invoice exactly.
	ResultMatch = "match"
	// ResultMatchAtClose: the log as it stood when the invoice was closed
	// recomputes it exactly; events of its period that arrived later
	// (within ingest's lateness, after the close's grace) are not billed.
	ResultMatchAtClose = "match_at_close"
	// ResultDifferent: neither does.
	ResultDifferent = "different"
)

// LateArrivals reads usage as it stood when each invoice was closed, and
// counts what arrived later.
type LateArrivals interface {
	UsageReader
	// ArrivedIn counts, per account, the events of period p that arrived
	// after the period's invoice was closed.
	ArrivedIn(ctx context.Context, p Period) (map[string]int64, error)
}

// Audit recomputes each ledger invoice from usage (a scratch database
// rebuilt from the raw event log) under the plan versions the ledger
// recorded for each segment, and compares. Invoices with one segment are
// read together, one query per period and meter. An invoice whose period
// had events arrive after it was closed (late, when set) is recomputed
// again without them: the invoice was closed on the log as it stood then.
// If that matches, the invoice is proved as it was closed, and the events
// it could not count are reported with what they would have added; if
// only the whole log matches, the invoice billed what the log did not
// hold at its close, and it is different.
func (iv *Invoicer) Audit(ctx context.Context, usage UsageReader, late LateArrivals, invs []StoredInvoice, progress func(done, total int)) ([]AuditResult, error) {
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
	arrived := map[Period]map[string]int64{}
	out := make([]AuditResult, 0, len(invs))
	for i, si := range invs {
		re, err := iv.recompute(ctx, usage, whole[si.Period], si)
		if err != nil {
			return nil, err
		}
		r := AuditResult{InvoiceID: si.ID, AccountID: si.AccountID, PeriodStart: si.Period.Start, PeriodEnd: si.Period.End,
			Currency: si.Currency, LedgerTotal: si.Total, ReplayTotal: re.Total,
			LedgerEvents: si.Fingerprint.EventCount, ReplayEvents: re.Fingerprint.EventCount,
			LedgerHash: si.Fingerprint.Hash, ReplayHash: re.Fingerprint.Hash, Result: ResultDifferent}
		// What the ledger's own records say against the document: a
		// difference there is never explained by events arriving late.
		recorded := recordDiffs(si)
		r.Differences = append(recorded, diff(si.Invoice, re)...)
		wholeMatch := r.LedgerHash == r.ReplayHash && len(r.Differences) == 0
		if late != nil && len(recorded) == 0 {
			in, ok := arrived[si.Period]
			if !ok {
				if in, err = late.ArrivedIn(ctx, si.Period); err != nil {
					return nil, err
				}
				arrived[si.Period] = in
			}
			r.ArrivedAfterClose = in[si.AccountID]
		}
		switch {
		case r.ArrivedAfterClose == 0:
			if wholeMatch {
				r.Result = ResultMatch
			}
		default:
			closed, err := iv.recompute(ctx, late, nil, si)
			if err != nil {
				return nil, err
			}
			closedMatch := closed.Fingerprint.Hash == si.Fingerprint.Hash && len(diff(si.Invoice, closed)) == 0
			switch {
			case closedMatch && wholeMatch:
				// The events that came late add nothing the invoice bills
				// (no meter counts them).
				r.Result = ResultMatch
			case closedMatch:
				r.Result, r.UnbilledTotal = ResultMatchAtClose, re.Total-si.Total
			case wholeMatch:
				// The log at the close held fewer events than the invoice
				// billed: it counted some the log did not have then (or
				// record times run behind the invoicer's clock).
				d := fmt.Sprintf("matches the log only with the %d events that reached it after the invoice was closed: at its close the log held less than it billed",
					r.ArrivedAfterClose)
				if at := diff(si.Invoice, closed); len(at) > 0 {
					d += " (at the close: " + strings.Join(at, "; ") + ")"
				}
				r.Differences = append(r.Differences, d)
			}
		}
		r.Match = r.Result == ResultMatch
		out = append(out, r)
		if progress != nil {
			progress(i+1, len(invs))
		}
	}
	return out, nil
}

// recompute computes a ledger invoice again from usage, under the plan
// versions the ledger recorded for each segment. whole, when set, holds
// the usage of the invoice's whole period (read for many accounts at once).
func (iv *Invoicer) recompute(ctx context.Context, usage UsageReader, whole map[string]AccountUsage, si StoredInvoice) (Invoice, error) {
	in := Inputs{AccountID: si.AccountID, Currency: si.Currency, Period: si.Period, Watermark: si.Fingerprint.Watermark}
	for _, s := range si.Fingerprint.Segments {
		// As it was billed: a definition this version reads strictly, and
		// would refuse, still proves what was billed under it.
		pl, err := iv.store.BilledPlan(ctx, s.PlanID, s.PlanVersion)
		if err != nil {
			return Invoice{}, fmt.Errorf("invoice %s: %w", si.ID, err)
		}
		in.Segments = append(in.Segments, Segment{Period: s.Period, Plan: pl})
		if len(si.Fingerprint.Segments) == 1 && whole != nil {
			u := whole[si.AccountID]
			in.EventCount, in.Usage = u.Events, []map[string]int64{orEmpty(u.Quantities)}
			continue
		}
		m, err := usage.Usage(ctx, []string{si.AccountID}, s.Period, iv.meters, schemas.Live)
		if err != nil {
			return Invoice{}, err
		}
		in.EventCount += m[si.AccountID].Events
		in.Usage = append(in.Usage, orEmpty(m[si.AccountID].Quantities))
	}
	re, err := Compute(in)
	if err != nil {
		return Invoice{}, fmt.Errorf("recompute invoice %s: %w", si.ID, err)
	}
	return re, nil
}

// recordDiffs names where the ledger's records of an invoice disagree with
// its document.
func recordDiffs(si StoredInvoice) []string {
	rec := si.Records
	if rec == nil {
		return nil
	}
	var d []string
	if rec.Total != si.Total {
		d = append(d, fmt.Sprintf("recorded total: invoice row %d, document %d", rec.Total, si.Total))
	}
	if rec.Hash != si.Fingerprint.Hash {
		d = append(d, fmt.Sprintf("recorded fingerprint hash: invoice row %s, document %s", rec.Hash, si.Fingerprint.Hash))
	}
	var lines int64
	for _, l := range si.Lines {
		lines += l.Amount
	}
	if rec.Lines != len(si.Lines) || rec.LinesTotal != lines {
		d = append(d, fmt.Sprintf("recorded lines: %d lines of %d in invoice_lines, %d lines of %d in the document",
			rec.Lines, rec.LinesTotal, len(si.Lines), lines))
	}
	for _, e := range []struct {
		kind   string
		amount *int64
		hash   string
	}{{"invoice.draft", rec.DraftAmount, rec.DraftHash}, {"invoice.finalized", rec.FinalizedAmount, rec.FinalizedHash}} {
		switch {
		case e.amount == nil:
			d = append(d, fmt.Sprintf("recorded %s entry: missing", e.kind))
		case *e.amount != si.Total || e.hash != si.Fingerprint.Hash:
			d = append(d, fmt.Sprintf("recorded %s entry: %d with hash %s, document %d with hash %s",
				e.kind, *e.amount, e.hash, si.Total, si.Fingerprint.Hash))
		}
	}
	return d
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
