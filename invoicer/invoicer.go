package invoicer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Account is what the invoicer needs to know about an account.
type Account struct {
	ID        string
	Name      string
	Email     string
	Timezone  string
	Currency  string
	CreatedAt time.Time
}

// Status is where an invoice is in its life, derived from its ledger
// entries (the newest status entry wins).
type Status string

// Invoice statuses.
const (
	StatusDraft         Status = "draft"
	StatusFinalized     Status = "finalized"
	StatusSynced        Status = "open"
	StatusPaid          Status = "paid"
	StatusPaymentFailed Status = "payment_failed"
	StatusVoid          Status = "void"
)

// StoredInvoice is an invoice as the ledger holds it.
type StoredInvoice struct {
	Invoice
	Status          Status    `json:"status"`
	StripeInvoiceID string    `json:"stripe_invoice_id,omitempty"`
	HostedURL       string    `json:"hosted_invoice_url,omitempty"`
	CreatedAt       time.Time `json:"created_at"`
	// Records, when loaded (ClosedInvoices, for replay), are what the
	// ledger keeps of the invoice beside its document.
	Records *LedgerRecords `json:"-"`
}

// LedgerRecords are what the ledger keeps of an invoice beside its
// document, each written when the invoice was: the invoice row's total and
// fingerprint hash (Stripe sync and credit notes act on the total), its
// lines, and its invoice.draft and invoice.finalized entries. Replay checks
// each against the document it proves, so a changed row is not proved by
// an unchanged document, nor a rewritten document by its own total.
type LedgerRecords struct {
	Total      int64
	Hash       string
	Lines      int
	LinesTotal int64
	// DraftHash and FinalizedHash are "" when the entry, or its hash, is
	// missing.
	DraftAmount, FinalizedAmount *int64
	DraftHash, FinalizedHash     string
}

// Store is the Postgres system of record as the invoicer uses it.
type Store interface {
	Plan(ctx context.Context, id string, version int) (Plan, error)
	// PlanVersions loads every version of a plan with when it was
	// published, oldest version first.
	PlanVersions(ctx context.Context, id string) ([]PlanVersion, error)
	// BilledPlan loads a plan version as invoices were billed under it,
	// for replay (ParseBilledDefinition).
	BilledPlan(ctx context.Context, id string, version int) (Plan, error)
	Accounts(ctx context.Context) ([]Account, error)
	Account(ctx context.Context, id string) (Account, error)
	// Subscriptions returns, per account, the subscriptions overlapping p.
	Subscriptions(ctx context.Context, accountIDs []string, p Period) (map[string][]Subscription, error)
	// InvoicedPeriods returns, per account, the periods of its invoices
	// that start at or after since.
	InvoicedPeriods(ctx context.Context, since time.Time) (map[string][]Period, error)
	// SaveDrafts stores invoices, their lines and an invoice.draft ledger
	// entry each, in one transaction; invoices that already exist are
	// left as they are.
	SaveDrafts(ctx context.Context, invs []Invoice) error
	// Finalize appends an invoice.finalized entry to each draft (once).
	Finalize(ctx context.Context, ids []string) error
	// FinalizeDrafts finalizes every invoice still a draft and says how
	// many it finalized.
	FinalizeDrafts(ctx context.Context) (int, error)
	Invoice(ctx context.Context, id string) (StoredInvoice, error)
	AccountInvoices(ctx context.Context, accountID string) ([]StoredInvoice, error)
	// AccountInvoicesBefore lists up to limit of an account's invoices
	// whose period starts before before (zero: all), newest first.
	AccountInvoicesBefore(ctx context.Context, accountID string, before time.Time, limit int) ([]StoredInvoice, error)
	// ClosedInvoices are the finalized invoices whose period starts in
	// [from, to).
	ClosedInvoices(ctx context.Context, from, to time.Time) ([]StoredInvoice, error)
	// UnsyncedInvoices are invoices finalized at or after since with a
	// positive total that Stripe does not have finalized yet.
	UnsyncedInvoices(ctx context.Context, since time.Time) ([]StoredInvoice, error)
	// StripeSyncStart records, the first time, that the ledger syncs to
	// Stripe from now on in mode ("live", "test", or "" when unknown), and
	// returns when that began and the mode recorded.
	StripeSyncStart(ctx context.Context, mode string) (time.Time, string, error)
	SyncState
	// RecordWebhook stores a verified Stripe event and its ledger entry,
	// once per event id; it reports whether the event was new.
	RecordWebhook(ctx context.Context, ev WebhookEvent) (bool, error)
	// AppendCreditNote corrects a finalized invoice without editing it.
	// A non-empty key makes it idempotent: a credit note appended before
	// with the same key, invoice, amount and reason is returned (Replayed)
	// instead of appending another; the key reused for anything else is
	// ErrConflict.
	AppendCreditNote(ctx context.Context, invoiceID string, amount int64, reason, key string) (CreditNoteResult, error)
}

// SyncState is the persisted progress of pushing invoices to Stripe.
type SyncState interface {
	// StripeCustomer returns the account's Stripe customer ("" if none),
	// and whether it replaced one Stripe no longer has.
	StripeCustomer(ctx context.Context, accountID string) (id string, replacement bool, err error)
	// SaveStripeCustomer records customerID as the account's Stripe
	// customer unless it has one already, and returns the one it has: an
	// account keeps its first customer, whoever asks after.
	SaveStripeCustomer(ctx context.Context, accountID, customerID string) (string, error)
	// ReplaceStripeCustomer records customerID as the account's Stripe
	// customer in place of replaced, which Stripe no longer has, unless a
	// replacement of replaced was recorded already, and returns the one
	// recorded. StripeCustomer returns the latest replacement from then on.
	ReplaceStripeCustomer(ctx context.Context, accountID, replaced, customerID string) (string, error)
	// SyncSteps maps each completed step ("invoice", "item:N",
	// "finalize") of an invoice to the Stripe object id it produced.
	SyncSteps(ctx context.Context, invoiceID string) (map[string]string, error)
	SaveSyncStep(ctx context.Context, invoiceID, step, stripeID string, detail map[string]string) error
	// MarkSynced appends the invoice.synced ledger entry.
	MarkSynced(ctx context.Context, invoiceID, stripeInvoiceID, hostedURL string) error
	// UnsyncedCreditNotes are the credit notes of invoices Stripe has
	// finalized that Stripe does not have yet, oldest first.
	UnsyncedCreditNotes(ctx context.Context) ([]CreditNote, error)
}

// CreditNote is a ledger credit note as the Stripe sync needs it.
type CreditNote struct {
	// ID is the ledger entry's id.
	ID              int64
	InvoiceID       string
	StripeInvoiceID string
	Currency        string
	// Amount is positive, in minor units.
	Amount int64
	Reason string
}

// CreditNoteResult is the credit note AppendCreditNote appended, or found
// appended before under the same idempotency key (Replayed).
type CreditNoteResult struct {
	// ID is the ledger entry's id.
	ID       int64
	Replayed bool
}

// MaxIdempotencyKey is the longest idempotency key accepted, as Stripe's.
const MaxIdempotencyKey = 255

// ValidIdempotencyKey reports whether key can name a credit note: empty (no
// key), or at most MaxIdempotencyKey printable ASCII characters.
func ValidIdempotencyKey(key string) error {
	if len(key) > MaxIdempotencyKey {
		return fmt.Errorf("%w: idempotency key is %d characters; at most %d", ErrInvalid, len(key), MaxIdempotencyKey)
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x21 || key[i] > 0x7e {
			return fmt.Errorf("%w: idempotency key must be printable ASCII without spaces", ErrInvalid)
		}
	}
	return nil
}

// creditNoteStep is the sync step of a credit note (stripe_sync_steps).
func creditNoteStep(id int64) string { return "credit_note:" + strconv.FormatInt(id, 10) }

// AccountUsage is one account's usage in a time range.
type AccountUsage struct {
	// Events counts raw events of every type (deduplicated).
	Events     int64
	Quantities map[string]int64
}

// UsageReader reads exact usage from the raw events.
type UsageReader interface {
	// Usage returns, for each of accounts with any events in p, the event
	// count and every meter's quantity in environment env.
	Usage(ctx context.Context, accounts []string, p Period, meters []meter.Meter, env schemas.Environment) (map[string]AccountUsage, error)
}

// Watermark tells through which event time usage is complete.
type Watermark interface {
	Watermark(ctx context.Context) (time.Time, error)
}

// ErrNoWatermark means the aggregator has not reported a watermark yet.
var ErrNoWatermark = errors.New("no usage watermark yet")

// Invoicer closes periods and syncs invoices to Stripe.
type Invoicer struct {
	store  Store
	usage  UsageReader
	wm     Watermark
	stripe Stripe // nil: Stripe sync disabled
	meters []meter.Meter
	grace  time.Duration
	log    *slog.Logger
	now    func() time.Time
	// lookback bounds how many past periods a close considers.
	lookback int
	// stripeMode is the Stripe key's mode (Options.StripeMode).
	stripeMode string
	m          *metrics
}

// Options configure an Invoicer.
type Options struct {
	Meters []meter.Meter
	// Grace is how long after a period's end (in watermark time) the
	// period is closed, for late events.
	Grace time.Duration
	// Lookback is how many months back periods are considered (default 12).
	Lookback int
	Now      func() time.Time
	// StripeMode is the Stripe key's mode, "live" or "test" (StripeKeyMode);
	// "" leaves it unchecked.
	StripeMode string
	// Registerer takes the invoicer's metrics (nil: kept, not served).
	Registerer prometheus.Registerer
}

// StripeKeyMode is the mode of a Stripe API key: "live" or "test", or ""
// for a key whose prefix says neither.
func StripeKeyMode(key string) string {
	for _, p := range []string{"sk_", "rk_"} {
		switch {
		case strings.HasPrefix(key, p+"live_"):
			return "live"
		case strings.HasPrefix(key, p+"test_"):
			return "test"
		}
	}
	return ""
}

// ErrStripeMode refuses to sync to Stripe with a key of the other mode
// than the ledger's.
var ErrStripeMode = errors.New("the Stripe key's mode is not the ledger's")

// stripeStart records that this ledger syncs to Stripe, before anything is
// finalized or synced with a key, and returns since when invoices are
// sent: those finalized before, while no key was set, stay in the ledger
// only. A key of the other mode than the ledger's is ErrStripeMode.
func (iv *Invoicer) stripeStart(ctx context.Context) (time.Time, error) {
	if iv.stripe == nil {
		return time.Time{}, nil
	}
	since, mode, err := iv.store.StripeSyncStart(ctx, iv.stripeMode)
	if err != nil {
		return time.Time{}, err
	}
	if mode != "" && iv.stripeMode != "" && mode != iv.stripeMode {
		return time.Time{}, fmt.Errorf("%w: this ledger syncs to Stripe in %s mode and the configured key is a %s-mode key; "+
			"its customers and invoices are not in that mode (use a %s-mode key, or another ledger database)", ErrStripeMode, mode, iv.stripeMode, mode)
	}
	return since, nil
}

// New returns an Invoicer. stripe may be nil to keep invoices in the ledger
// only.
func New(store Store, usage UsageReader, wm Watermark, stripe Stripe, opts Options, log *slog.Logger) (*Invoicer, error) {
	if len(opts.Meters) == 0 {
		opts.Meters = []meter.Meter{meter.Default()}
	}
	for _, m := range opts.Meters {
		if err := m.Validate(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	if opts.Lookback <= 0 {
		opts.Lookback = 12
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	return &Invoicer{store: store, usage: usage, wm: wm, stripe: stripe, meters: opts.Meters,
		grace: opts.Grace, log: log, now: opts.Now, lookback: opts.Lookback, stripeMode: opts.StripeMode, m: m}, nil
}

// CloseResult summarises one close run.
type CloseResult struct {
	Watermark time.Time
	Closed    []Invoice
	// Failed are the accounts, per period start, whose invoice could not
	// be computed (each is logged with its cause); the next run tries them
	// again.
	Failed map[time.Time][]string
}

// CloseDue invoices every account for every period that ended, in the
// account's time zone, at least the grace before the watermark and has no
// invoice yet (duePeriods: after a zone change, periods run from where the
// old zone's invoices end). Retrying is safe: invoice ids are
// deterministic and stored once.
func (iv *Invoicer) CloseDue(ctx context.Context) (CloseResult, error) {
	wm, err := iv.wm.Watermark(ctx)
	if err != nil {
		return CloseResult{}, fmt.Errorf("read watermark: %w", err)
	}
	res := CloseResult{Watermark: wm}
	iv.m.watermarkLag.Set(max(0, iv.now().Sub(wm).Seconds()))
	// Recorded before anything is finalized with a key set, so that what
	// this close finalizes is sent to Stripe. A key of the wrong mode does
	// not stop the close: only the sync refuses it.
	if _, err := iv.stripeStart(ctx); err != nil && !errors.Is(err, ErrStripeMode) {
		return res, err
	}
	// A close that stopped after saving its drafts left them unfinalized,
	// and their periods count as invoiced: finish them first.
	if n, err := iv.store.FinalizeDrafts(ctx); err != nil {
		return res, err
	} else if n > 0 {
		iv.log.Warn("finalized invoices an earlier close left as drafts", "invoices", n)
	}
	accounts, err := iv.store.Accounts(ctx)
	if err != nil {
		return res, err
	}
	now := iv.now()
	// Invoices that start up to three months before the oldest month
	// considered: one made across a zone change may reach into it.
	since := now.AddDate(0, -iv.lookback-3, 0)
	done, err := iv.store.InvoicedPeriods(ctx, since)
	if err != nil {
		return res, err
	}
	// Group the accounts due by period, so usage is read once per period.
	due := map[Period][]Account{}
	for _, a := range accounts {
		loc, err := caltime.LoadZone(a.Timezone)
		if err != nil {
			// A zone set in Postgres by hand, or one a tzdata update
			// removed: the account cannot be invoiced, and the run says
			// so (failed, accounts_not_invoiced) as for any account that
			// cannot be, under the last month's start in UTC, its periods
			// being unknown. Before, only a log line said it, and its
			// periods slid out of lookback_months unbilled.
			iv.log.Error("account has an unknown time zone; not invoiced until it is set to one this build knows",
				"account", a.ID, "timezone", a.Timezone, "err", err)
			if res.Failed == nil {
				res.Failed = map[time.Time][]string{}
			}
			last := MonthPeriod(now, time.UTC).Start.AddDate(0, -1, 0)
			res.Failed[last] = append(res.Failed[last], a.ID)
			iv.m.notInvoiced.Inc()
			continue
		}
		var months []Period // oldest first
		p := MonthPeriod(now, loc)
		for i := 0; i < iv.lookback; i++ {
			p = MonthPeriod(p.Start.Add(-time.Second), loc)
			if !p.End.After(a.CreatedAt) {
				break // the account did not exist in this period
			}
			months = append(months, p)
		}
		slices.Reverse(months)
		// Usage of a period (plus grace) must be complete.
		ready := func(p Period) bool { return !p.End.Add(iv.grace).After(wm) }
		for _, p := range duePeriods(months, done[a.ID], a.CreatedAt, ready) {
			due[p] = append(due[p], a)
		}
	}
	periods := make([]Period, 0, len(due))
	for p := range due {
		periods = append(periods, p)
	}
	sort.Slice(periods, func(i, j int) bool { return periods[i].Start.Before(periods[j].Start) })
	for _, p := range periods {
		t0 := time.Now()
		invs, err := iv.ComputePeriod(ctx, iv.usage, p, due[p], wm)
		if err != nil && ctx.Err() == nil {
			// One account's problem (a plan that does not load, say) must
			// not hold back every other account's invoice: compute each
			// alone, and leave the failing ones for the next run.
			invs = nil
			for _, a := range due[p] {
				one, err := iv.ComputePeriod(ctx, iv.usage, p, []Account{a}, wm)
				if err != nil {
					// The period is retried while it is among the lookback's
					// months, and never after: say until when.
					iv.log.Error("account not invoiced for the period; retried on every run until the period leaves lookback_months, then never",
						"account", a.ID, "period", p.Start.Format(time.RFC3339),
						"retried_until", p.Start.AddDate(0, iv.lookback+1, 0).Format(time.RFC3339), "err", err)
					if res.Failed == nil {
						res.Failed = map[time.Time][]string{}
					}
					res.Failed[p.Start] = append(res.Failed[p.Start], a.ID)
					iv.m.notInvoiced.Inc()
					continue
				}
				invs = append(invs, one...)
			}
			err = nil
		}
		computed := time.Since(t0)
		if err != nil {
			return res, fmt.Errorf("close %s: %w", p.Start.Format("2006-01"), err)
		}
		if len(invs) == 0 {
			continue
		}
		if err := iv.store.SaveDrafts(ctx, invs); err != nil {
			return res, err
		}
		ids := make([]string, len(invs))
		for i, inv := range invs {
			ids[i] = inv.ID
		}
		if err := iv.store.Finalize(ctx, ids); err != nil {
			return res, err
		}
		res.Closed = append(res.Closed, invs...)
		iv.m.invoices.Add(float64(len(invs)))
		iv.log.Info("period closed", "period", p.Start.Format(time.RFC3339), "invoices", len(invs),
			"compute", computed.Round(time.Millisecond), "store", (time.Since(t0) - computed).Round(time.Millisecond))
	}
	return res, nil
}

// ComputePeriod computes the invoices of accounts for period p from the
// usage usage reads. Every account's whole-period usage is read in one
// query, while plans and subscriptions load from the store; accounts whose
// plan changed within the period are then read again segment by segment.
func (iv *Invoicer) ComputePeriod(ctx context.Context, usage UsageReader, p Period, accounts []Account, wm time.Time) ([]Invoice, error) {
	ids := make([]string, len(accounts))
	for i, a := range accounts {
		ids[i] = a.ID
	}
	type read struct {
		usage map[string]AccountUsage
		err   error
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	whole := make(chan read, 1)
	// The wall clock, not iv.now: it is compared with Kafka record times.
	wholeReadAt := time.Now().UTC()
	go func() {
		u, err := usage.Usage(rctx, ids, p, iv.meters, schemas.Live)
		whole <- read{u, err}
	}()
	segs, err := iv.segments(ctx, p, accounts, ids)
	if err != nil {
		cancel()
		<-whole
		return nil, err
	}
	r := <-whole
	if r.err != nil {
		return nil, r.err
	}
	byPeriod := r.usage
	invs := make([]Invoice, 0, len(accounts))
	for i, a := range accounts {
		in := Inputs{AccountID: a.ID, Currency: a.Currency, Period: p, Segments: segs[i], Watermark: wm, UsageReadAt: wholeReadAt}
		if len(segs[i]) == 1 {
			u := byPeriod[a.ID]
			in.EventCount, in.Usage = u.Events, []map[string]int64{orEmpty(u.Quantities)}
		} else {
			// Read again segment by segment: these reads are the ones
			// the invoice counts.
			in.UsageReadAt = time.Now().UTC()
			for _, s := range segs[i] {
				m, err := usage.Usage(ctx, []string{a.ID}, s.Period, iv.meters, schemas.Live)
				if err != nil {
					return nil, err
				}
				in.EventCount += m[a.ID].Events
				in.Usage = append(in.Usage, orEmpty(m[a.ID].Quantities))
			}
		}
		inv, err := Compute(in)
		if err != nil {
			return nil, fmt.Errorf("account %s: %w", a.ID, err)
		}
		invs = append(invs, inv)
	}
	return invs, nil
}

// segments splits each account's period where its plan changes.
func (iv *Invoicer) segments(ctx context.Context, p Period, accounts []Account, ids []string) ([][]Segment, error) {
	free, err := iv.store.PlanVersions(ctx, FreePlanID)
	if err != nil {
		return nil, fmt.Errorf("load free plan: %w", err)
	}
	if len(free) == 0 {
		return nil, fmt.Errorf("load free plan: %w", ErrNotFound)
	}
	plans := map[[2]any]Plan{}
	planOf := func(id string, v int) (Plan, error) {
		k := [2]any{id, v}
		if pl, ok := plans[k]; ok {
			return pl, nil
		}
		pl, err := iv.store.Plan(ctx, id, v)
		if err != nil {
			return Plan{}, err
		}
		plans[k] = pl
		return pl, nil
	}
	subs, err := iv.store.Subscriptions(ctx, ids, p)
	if err != nil {
		return nil, err
	}
	segs := make([][]Segment, len(accounts))
	for i, a := range accounts {
		if segs[i], err = Segments(p, subs[a.ID], planOf, free); err != nil {
			return nil, fmt.Errorf("account %s: %w", a.ID, err)
		}
		for _, s := range segs[i] {
			if err := iv.pricedMeters(s.Plan); err != nil {
				return nil, fmt.Errorf("account %s: %w", a.ID, err)
			}
		}
	}
	return segs, nil
}

// pricedMeters checks that every meter a plan's prices charge for is
// configured: one that is not would read as no usage and bill nothing,
// and a replay with the same configuration would agree.
func (iv *Invoicer) pricedMeters(pl Plan) error {
	for _, pr := range pl.Definition.Prices {
		if pr.Model == Flat || pr.chargesNothing() {
			continue
		}
		if !slices.ContainsFunc(iv.meters, func(m meter.Meter) bool { return m.Key == pr.Meter }) {
			return fmt.Errorf("%w: plan %s v%d prices meter %q, which is not configured (meters)", ErrInvalid, pl.ID, pl.Version, pr.Meter)
		}
	}
	return nil
}

func orEmpty(m map[string]int64) map[string]int64 {
	if m == nil {
		return map[string]int64{}
	}
	return m
}

// Run closes due periods and syncs Stripe every interval until ctx ends.
// Failures are logged and retried on the next tick: every step is
// idempotent.
func (iv *Invoicer) Run(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := iv.Once(ctx); err != nil && ctx.Err() == nil {
			iv.log.Error("invoicer run failed; retrying next interval", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Once closes due periods, then pushes unsynced invoices to Stripe.
func (iv *Invoicer) Once(ctx context.Context) error {
	res, cerr := iv.CloseDue(ctx)
	// The watermark trails the clock by seconds while ingest keeps up. Past
	// the grace, a period that ended waits for it: said here, or a stalled
	// ingest would only show as invoices that never come.
	if lag := iv.now().Sub(res.Watermark); cerr == nil && lag > iv.grace {
		iv.log.Warn("usage watermark is behind: periods that ended wait for it", "watermark", res.Watermark,
			"behind", lag.Round(time.Second), "grace", iv.grace)
	}
	if errors.Is(cerr, ErrNoWatermark) {
		iv.log.Warn("no usage watermark yet; no period can be closed")
		cerr = nil
	}
	var serr error
	if iv.stripe != nil {
		serr = iv.SyncStripe(ctx)
	}
	err := errors.Join(cerr, serr)
	// An account left uninvoiced fails the run's health too: its invoice
	// never comes until someone looks.
	if err == nil && len(res.Failed) > 0 {
		iv.m.ran(errors.New("accounts not invoiced"), iv.now())
	} else {
		iv.m.ran(err, iv.now())
	}
	return err
}
