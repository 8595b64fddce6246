// Package invoicer turns closed billing periods into invoices: it prices
// each account's metered usage under the plan versions in force, records the
// invoice and the fingerprint of its inputs in an append-only Postgres
// ledger, pushes it to Stripe idempotently, and can recompute any invoice
// from the raw events to prove it.
//
// The domain lives here (plans, pricing, periods, invoices and the small
// interfaces the invoicer needs); invoicer/postgres, invoicer/clickhouse and
// invoicer/stripe implement those interfaces.
package invoicer

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
)

// Domain errors, mapped to HTTP in one place (the API's error handler).
var (
	ErrInvalid      = errors.New("invalid")
	ErrNotFound     = errors.New("not found")
	ErrConflict     = errors.New("conflict")
	ErrUnauthorized = errors.New("unauthorized")
	ErrForbidden    = errors.New("forbidden")
)

// FreePlanID is the plan of every account without a subscription in force.
const FreePlanID = "free"

// Period is a half-open time range [Start, End).
type Period struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
}

// Seconds is the period's length in whole seconds.
func (p Period) Seconds() int64 { return int64(p.End.Sub(p.Start) / time.Second) }

// MonthPeriod is the calendar month containing t in loc: billing periods
// follow the account's own time zone, so a Tokyo customer's March starts
// at midnight in Tokyo.
func MonthPeriod(t time.Time, loc *time.Location) Period {
	lt := t.In(loc)
	return Period{Start: caltime.MonthStart(lt.Year(), lt.Month(), loc).UTC(), End: caltime.MonthStart(lt.Year(), lt.Month()+1, loc).UTC()}
}

// Subscription is a plan version in force for an account from StartsAt
// until EndsAt (nil: open-ended).
type Subscription struct {
	AccountID   string
	PlanID      string
	PlanVersion int
	StartsAt    time.Time
	EndsAt      *time.Time
}

// Segment is a part of a period during which one plan version was in force.
type Segment struct {
	Period
	Plan Plan
}

// PlanVersion is a plan version with the time it was published
// (plans.created_at).
type PlanVersion struct {
	Plan
	Since time.Time
	// Err is why the version could not be read (ParseDefinition), if it
	// could not: only time it prices fails.
	Err error
}

// freeAt is the free version in force at t: the newest published by then,
// as the edge applies the newest version to each call it takes. Time
// before the first publication (an account older than the install that
// seeded it) is on the oldest version.
func freeAt(free []PlanVersion, t time.Time) (Plan, error) {
	in := free[0]
	for _, v := range free[1:] {
		if !v.Since.Truncate(time.Second).After(t) && v.Version > in.Version {
			in = v
		}
	}
	if in.Err != nil {
		return Plan{}, fmt.Errorf("free plan v%d, in force from %s: %w", in.Version, t.UTC().Format(time.RFC3339), in.Err)
	}
	return in.Plan, nil
}

// Segments splits period by the subscriptions in force; any time no
// subscription covers is on the free version in force then (free, oldest
// version first; at least one). Overlapping subscriptions are resolved in
// favour of the one that started later (a plan change starts a new
// subscription; the old one may not have been ended yet).
func Segments(period Period, subs []Subscription, plan func(id string, version int) (Plan, error), free []PlanVersion) ([]Segment, error) {
	if len(free) == 0 {
		return nil, fmt.Errorf("segments: %w: no free plan", ErrNotFound)
	}
	subs = append([]Subscription(nil), subs...)
	// Boundaries count from their whole second, as usage is read (the raw
	// table keeps whole seconds) and as proration counts: a change at
	// 10:00:00.5 is a change at 10:00:00. Cut mid-second, each segment's
	// whole seconds summed to one second short of the period.
	for i := range subs {
		subs[i].StartsAt = subs[i].StartsAt.Truncate(time.Second)
		if e := subs[i].EndsAt; e != nil {
			t := e.Truncate(time.Second)
			subs[i].EndsAt = &t
		}
	}
	sort.SliceStable(subs, func(i, j int) bool { return subs[i].StartsAt.Before(subs[j].StartsAt) })
	// Boundaries: period ends, every subscription edge inside it, and
	// every free version's publication (a cut no free time spans merges
	// back below).
	cuts := []time.Time{period.Start, period.End}
	for _, v := range free {
		if t := v.Since.Truncate(time.Second); t.After(period.Start) && t.Before(period.End) {
			cuts = append(cuts, t)
		}
	}
	for _, s := range subs {
		for _, t := range []*time.Time{&s.StartsAt, s.EndsAt} {
			if t != nil && t.After(period.Start) && t.Before(period.End) {
				cuts = append(cuts, *t)
			}
		}
	}
	sort.Slice(cuts, func(i, j int) bool { return cuts[i].Before(cuts[j]) })
	var out []Segment
	for i := 0; i+1 < len(cuts); i++ {
		from, to := cuts[i], cuts[i+1]
		if !from.Before(to) {
			continue
		}
		// The subscription in force that started last wins; only its plan
		// is loaded, so an older one never ended (a plan change starts a
		// new subscription) whose version is refused fails nothing it
		// does not price.
		var win *Subscription
		for i := range subs {
			if s := &subs[i]; !s.StartsAt.After(from) && (s.EndsAt == nil || s.EndsAt.After(from)) {
				win = s
			}
		}
		var p Plan
		var err error
		if win != nil {
			p, err = plan(win.PlanID, win.PlanVersion)
		} else {
			p, err = freeAt(free, from)
		}
		if err != nil {
			return nil, err
		}
		if n := len(out); n > 0 && out[n-1].Plan.ID == p.ID && out[n-1].Plan.Version == p.Version {
			out[n-1].End = to
			continue
		}
		out = append(out, Segment{Period: Period{Start: from, End: to}, Plan: p})
	}
	return out, nil
}

// Line is one invoice line: a price applied to the quantity of one segment.
type Line struct {
	No          int    `json:"no"`
	PriceKey    string `json:"price_key"`
	Description string `json:"description"`
	Model       Model  `json:"model"`
	Meter       string `json:"meter,omitempty"`
	PlanID      string `json:"plan_id"`
	PlanVersion int    `json:"plan_version"`
	Period      Period `json:"period"`
	Priced
	// Proration is the fraction of the period a flat fee is charged for,
	// as "seconds/seconds"; empty when not prorated.
	Proration string `json:"proration,omitempty"`
	// Amount is the line total in minor units, rounded once (half even).
	Amount int64 `json:"amount"`
}

// SegmentUsage is the metered quantities of one segment.
type SegmentUsage struct {
	Period
	PlanID      string           `json:"plan_id"`
	PlanVersion int              `json:"plan_version"`
	Quantities  map[string]int64 `json:"quantities"`
}

// Fingerprint identifies an invoice's inputs: what was counted, under which
// plan versions, up to which watermark. Two computations with the same Hash
// priced the same inputs.
type Fingerprint struct {
	// EventCount is the number of live raw events of the account in the
	// period (every type, deduplicated).
	EventCount int64          `json:"event_count"`
	Segments   []SegmentUsage `json:"segments"`
	// Watermark is the aggregator watermark the period was closed under;
	// it is recorded but not hashed, so a replay can prove the hash.
	Watermark time.Time `json:"watermark"`
	// UsageReadAt is when the close began reading the account's usage
	// (the invoicer's clock), recorded but not hashed: replay takes the
	// events whose records came after it as reaching the log after the
	// close. Zero on invoices closed before it was recorded.
	UsageReadAt time.Time `json:"usage_read_at,omitzero"`
	Hash        string    `json:"hash"`
}

// Invoice is one account's invoice for one period.
type Invoice struct {
	ID          string      `json:"id"`
	AccountID   string      `json:"account_id"`
	Currency    string      `json:"currency"`
	Period      Period      `json:"period"`
	Lines       []Line      `json:"lines"`
	Total       int64       `json:"total"`
	Fingerprint Fingerprint `json:"fingerprint"`
}

// InvoiceID is deterministic in the account and period, so a retried close
// can never make a second invoice for the same period.
func InvoiceID(accountID string, p Period) string {
	h := sha256.Sum256([]byte(accountID + "\x00" + p.Start.UTC().Format(time.RFC3339)))
	return "inv_" + p.Start.UTC().Format("200601") + "_" + hex.EncodeToString(h[:8])
}

// Inputs is everything an invoice is a pure function of.
type Inputs struct {
	AccountID  string
	Currency   string
	Period     Period
	Segments   []Segment
	Usage      []map[string]int64 // one per segment: meter key → quantity
	EventCount int64
	Watermark  time.Time
	// UsageReadAt is recorded in the fingerprint (Fingerprint.UsageReadAt).
	UsageReadAt time.Time
}

// Compute prices the inputs. It is pure: the same inputs always give the
// same invoice, which is what replay relies on.
//
// Rules (docs/billing-rules.md): usage is priced under the plan version in
// force when it happened, each segment on its own with that plan's tiers and
// allowance; flat fees are prorated by seconds in force over seconds in the
// period; every line is computed exactly and rounded half-even to a whole
// minor unit once; the total is the sum of the rounded lines.
func Compute(in Inputs) (Invoice, error) {
	if len(in.Usage) != len(in.Segments) {
		return Invoice{}, fmt.Errorf("%w: %d usage sets for %d segments", ErrInvalid, len(in.Usage), len(in.Segments))
	}
	if _, err := MinorExponent(in.Currency); err != nil {
		return Invoice{}, err
	}
	inv := Invoice{ID: InvoiceID(in.AccountID, in.Period), AccountID: in.AccountID,
		Currency: in.Currency, Period: in.Period, Lines: []Line{}}
	fp := Fingerprint{EventCount: in.EventCount, Watermark: in.Watermark.UTC(), UsageReadAt: in.UsageReadAt.UTC()}
	whole := in.Period.Seconds()
	for i, seg := range in.Segments {
		// A plan that charges nothing (the free plan) prices in any
		// currency: there is one free plan, in one currency, for every
		// account's time on no subscription.
		if seg.Plan.Currency != in.Currency && !seg.Plan.ChargesNothing() {
			return Invoice{}, fmt.Errorf("%w: plan %s v%d is priced in %s, account %s bills in %s",
				ErrInvalid, seg.Plan.ID, seg.Plan.Version, seg.Plan.Currency, in.AccountID, in.Currency)
		}
		su := SegmentUsage{Period: seg.Period, PlanID: seg.Plan.ID, PlanVersion: seg.Plan.Version, Quantities: map[string]int64{}}
		for _, p := range seg.Plan.Definition.Prices {
			q := int64(0)
			if p.Model != Flat {
				q = in.Usage[i][p.Meter]
				su.Quantities[p.Meter] = q
				if meter.Overflowed(q) {
					// A sum past int64, saturated where it was read: priced,
					// a tiny unit amount would bill it as if it were usage,
					// and the smallest value as none.
					return Invoice{}, fmt.Errorf("%w: usage of meter %s from %s to %s adds up past int64",
						ErrOverflow, p.Meter, seg.Period.Start.UTC().Format(time.RFC3339), seg.Period.End.UTC().Format(time.RFC3339))
				}
			}
			priced, err := p.Apply(q)
			if err != nil {
				return Invoice{}, err
			}
			l := Line{No: len(inv.Lines) + 1, PriceKey: p.Key, Description: p.Description, Model: p.Model,
				Meter: p.Meter, PlanID: seg.Plan.ID, PlanVersion: seg.Plan.Version, Period: seg.Period, Priced: priced}
			if l.Description == "" {
				l.Description = p.Key
			}
			if part := seg.Seconds(); p.Model == Flat && part != whole {
				l.Proration = fmt.Sprintf("%d/%d", part, whole)
				l.Amount, err = prorate(priced.Exact, part, whole, LineStep(in.Currency))
			} else {
				l.Amount, err = RoundLine(priced.Exact, in.Currency)
			}
			if err != nil {
				return Invoice{}, fmt.Errorf("line %s: %w", p.Key, err)
			}
			if inv.Total, err = addMinor(inv.Total, l.Amount); err != nil {
				return Invoice{}, err
			}
			inv.Lines = append(inv.Lines, l)
		}
		fp.Segments = append(fp.Segments, su)
	}
	fp.Hash = fp.hash(inv)
	inv.Fingerprint = fp
	return inv, nil
}

// hash covers the inputs (event count, quantities, plan versions, period)
// and the resulting amounts, in a canonical JSON form (map keys sorted by
// encoding/json).
func (fp Fingerprint) hash(inv Invoice) string {
	amounts := make([]int64, len(inv.Lines))
	for i, l := range inv.Lines {
		amounts[i] = l.Amount
	}
	b, _ := json.Marshal(struct {
		Account  string         `json:"account"`
		Currency string         `json:"currency"`
		Period   Period         `json:"period"`
		Events   int64          `json:"events"`
		Segments []SegmentUsage `json:"segments"`
		Amounts  []int64        `json:"amounts"`
		Total    int64          `json:"total"`
	}{inv.AccountID, inv.Currency, inv.Period, fp.EventCount, fp.Segments, amounts, inv.Total})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
