package invoicer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/tollgate-dev/tollgate/internal/caltime"
)

// Stripe is the part of Stripe the invoicer uses. Every call carries an
// idempotency key derived from ledger ids, so repeating a call after a
// crash returns the object the first call made instead of a second one.
// ErrStripeCustomerGone is what CreateInvoice's error wraps when Stripe
// has no such customer: it was deleted in Stripe (its dashboard or API).
var ErrStripeCustomerGone = errors.New("the stripe customer no longer exists")

// ErrStripeCustomerUnknown is what CustomerDeleted's error wraps when
// Stripe has no record of the customer at all, deleted or not: the key is
// of the other mode, or of another Stripe account.
var ErrStripeCustomerUnknown = errors.New("the stripe customer is unknown to this key")

type Stripe interface {
	EnsureCustomer(ctx context.Context, p CustomerParams) (string, error)
	// CustomerDeleted reports whether Stripe holds the customer as
	// deleted. A customer Stripe does not know at all (a key of the other
	// mode, or of another Stripe account) is an error, not a deletion.
	CustomerDeleted(ctx context.Context, customerID string) (bool, error)
	CreateInvoice(ctx context.Context, p InvoiceParams) (string, error)
	CreateInvoiceItem(ctx context.Context, p InvoiceItemParams) (string, error)
	FinalizeInvoice(ctx context.Context, stripeInvoiceID, idempotencyKey string) (FinalizedInvoice, error)
	CreateCreditNote(ctx context.Context, p CreditNoteParams) (string, error)
}

// CreditNoteParams credit part of a finalized Stripe invoice: on an open
// invoice it lowers what is due; on a paid one it goes to the customer's
// balance, for their next invoice (a refund is an operator's decision,
// made in Stripe).
type CreditNoteParams struct {
	StripeInvoiceID string
	Amount          int64 // Stripe's units (StripeAmount)
	Reason          string
	CreditNoteID    int64 // the ledger entry's id, kept in metadata
	InvoiceID       string
	IdempotencyKey  string
}

// CustomerParams create the Stripe customer of an account.
type CustomerParams struct {
	AccountID      string
	Name           string
	Email          string
	IdempotencyKey string
}

// InvoiceParams create a draft Stripe invoice that collects only the items
// attached to it explicitly.
type InvoiceParams struct {
	CustomerID     string
	Currency       string
	InvoiceID      string // the ledger's invoice id, kept in metadata
	Description    string
	IdempotencyKey string
}

// InvoiceItemParams add one line to a draft Stripe invoice.
type InvoiceItemParams struct {
	CustomerID      string
	StripeInvoiceID string
	Currency        string
	Amount          int64 // minor units
	Description     string
	InvoiceID       string
	LineNo          int
	IdempotencyKey  string
}

// FinalizedInvoice is what Stripe reports after finalizing.
type FinalizedInvoice struct {
	ID        string
	Status    string
	HostedURL string
}

// Sync step names, as stored in stripe_sync_steps.
const (
	stepInvoice  = "invoice"
	stepFinalize = "finalize"
)

func stepItem(no int) string { return "item:" + strconv.Itoa(no) }

// idempotency keys: one per Stripe object, derived from ledger ids.
func customerKey(accountID string) string { return "tollgate:customer:" + accountID }
func stepKey(invoiceID, step string) string {
	return "tollgate:" + invoiceID + ":" + step
}

// SyncStripe pushes every finalized, unsynced invoice to Stripe. Test-mode
// usage never reaches here: invoices are computed from live events only.
//
// Only invoices finalized since the ledger first ran with a key are sent
// (stripeStart): a key set after months without one does not create and
// charge every past invoice at once.
func (iv *Invoicer) SyncStripe(ctx context.Context) error {
	since, err := iv.stripeStart(ctx)
	if err != nil {
		return err
	}
	invs, err := iv.store.UnsyncedInvoices(ctx, since)
	if err != nil {
		return err
	}
	iv.m.unsynced.Set(float64(len(invs)))
	// One invoice Stripe refuses (a deleted customer, say) must not hold
	// back the others: each is tried, and the failures are returned
	// together, to be tried again on the next run.
	var errs []error
	for _, inv := range invs {
		if ctx.Err() != nil {
			return errors.Join(append(errs, ctx.Err())...)
		}
		if err := iv.syncOne(ctx, inv); err != nil {
			iv.m.syncFailed.WithLabelValues("invoice").Inc()
			iv.log.Error("invoice not synced to Stripe; retried on the next run", "invoice", inv.ID, "err", err)
			errs = append(errs, fmt.Errorf("sync invoice %s to stripe: %w", inv.ID, err))
		} else {
			iv.m.synced.WithLabelValues("invoice").Inc()
		}
	}
	// Credit notes of invoices Stripe has finalized (those of the
	// invoices just synced included).
	notes, err := iv.store.UnsyncedCreditNotes(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, cn := range notes {
		if ctx.Err() != nil {
			return errors.Join(append(errs, ctx.Err())...)
		}
		if err := iv.syncCreditNote(ctx, cn); err != nil {
			iv.m.syncFailed.WithLabelValues("credit_note").Inc()
			iv.log.Error("credit note not synced to Stripe; retried on the next run", "invoice", cn.InvoiceID, "credit_note", cn.ID, "err", err)
			errs = append(errs, fmt.Errorf("sync credit note %d of %s to stripe: %w", cn.ID, cn.InvoiceID, err))
		} else {
			iv.m.synced.WithLabelValues("credit_note").Inc()
		}
	}
	return errors.Join(errs...)
}

// syncCreditNote creates one credit note in Stripe and records the step.
func (iv *Invoicer) syncCreditNote(ctx context.Context, cn CreditNote) error {
	amount, err := StripeAmount(cn.Amount, cn.Currency)
	if err != nil {
		return err
	}
	step := creditNoteStep(cn.ID)
	id, err := iv.stripe.CreateCreditNote(ctx, CreditNoteParams{StripeInvoiceID: cn.StripeInvoiceID, Amount: amount,
		Reason: cn.Reason, CreditNoteID: cn.ID, InvoiceID: cn.InvoiceID, IdempotencyKey: stepKey(cn.InvoiceID, step)})
	if err != nil {
		return err
	}
	return iv.store.SaveSyncStep(ctx, cn.InvoiceID, step, id, nil)
}

// syncOne runs the steps customer → invoice → items → finalize, skipping
// the ones the sync state says are done. A crash between a Stripe call and
// the write of its step repeats the call with the same idempotency key,
// which returns the same object.
func (iv *Invoicer) syncOne(ctx context.Context, inv StoredInvoice) error {
	cust, replacement, err := iv.store.StripeCustomer(ctx, inv.AccountID)
	if err != nil {
		return err
	}
	a, err := iv.store.Account(ctx, inv.AccountID)
	if err != nil {
		return err
	}
	// The customer reads the period's days in the account's zone, as the
	// period was cut (an unknown zone was refused at the close), or in the
	// zone it was cut in when the account has moved since (cutZone).
	loc, err := caltime.LoadZone(a.Timezone)
	if err != nil {
		loc = time.UTC
	}
	days := dayZones{loc: loc, period: inv.Period, start: cutZone(inv.Period.Start, loc), end: cutZone(inv.Period.End, loc)}
	if cust == "" {
		if cust, err = iv.stripe.EnsureCustomer(ctx, CustomerParams{AccountID: a.ID, Name: a.Name,
			Email: a.Email, IdempotencyKey: customerKey(a.ID)}); err != nil {
			return fmt.Errorf("customer: %w", err)
		}
		// Another instance may have recorded a customer of its own first
		// (Stripe's search lags, and the two asks need not share a key):
		// the invoice goes to the recorded one, which every later run
		// looks its invoices up under.
		if cust, err = iv.store.SaveStripeCustomer(ctx, a.ID, cust); err != nil {
			return err
		}
	}
	steps, err := iv.store.SyncSteps(ctx, inv.ID)
	if err != nil {
		return err
	}
	sinv := steps[stepInvoice]
	if sinv == "" {
		desc := "Usage " + days.of(inv.Period)
		create := func() (string, error) {
			// A replacement customer's invoice has a key of its own: the
			// key's first use, for the customer Stripe no longer had, may
			// hold that answer.
			key := stepKey(inv.ID, stepInvoice)
			if replacement {
				key += ":" + cust
			}
			return iv.stripe.CreateInvoice(ctx, InvoiceParams{CustomerID: cust, Currency: inv.Currency,
				InvoiceID: inv.ID, Description: desc, IdempotencyKey: key})
		}
		sinv, err = create()
		if errors.Is(err, ErrStripeCustomerGone) {
			// The customer was deleted in Stripe: every later invoice of
			// the account would fail the same way, for good. The account
			// gets a new customer, recorded in place of the old one.
			if cust, err = iv.replaceCustomer(ctx, a, cust); err != nil {
				return err
			}
			replacement = true
			sinv, err = create()
		}
		if err != nil {
			return fmt.Errorf("invoice: %w", err)
		}
		if err := iv.store.SaveSyncStep(ctx, inv.ID, stepInvoice, sinv, nil); err != nil {
			return err
		}
	}
	for _, l := range inv.Lines {
		step := stepItem(l.No)
		if l.Amount == 0 || steps[step] != "" {
			continue
		}
		amount, err := StripeAmount(l.Amount, inv.Currency)
		if err != nil {
			return fmt.Errorf("item %d: %w", l.No, err)
		}
		id, err := iv.stripe.CreateInvoiceItem(ctx, InvoiceItemParams{CustomerID: cust, StripeInvoiceID: sinv,
			Currency: inv.Currency, Amount: amount, Description: lineDescription(l, days),
			InvoiceID: inv.ID, LineNo: l.No, IdempotencyKey: stepKey(inv.ID, step)})
		if err != nil {
			return fmt.Errorf("item %d: %w", l.No, err)
		}
		if err := iv.store.SaveSyncStep(ctx, inv.ID, step, id, nil); err != nil {
			return err
		}
	}
	hosted := ""
	if steps[stepFinalize] == "" {
		fin, err := iv.stripe.FinalizeInvoice(ctx, sinv, stepKey(inv.ID, stepFinalize))
		if err != nil {
			return fmt.Errorf("finalize: %w", err)
		}
		hosted = fin.HostedURL
		if err := iv.store.SaveSyncStep(ctx, inv.ID, stepFinalize, fin.ID, map[string]string{"hosted_invoice_url": hosted, "status": fin.Status}); err != nil {
			return err
		}
	}
	return iv.store.MarkSynced(ctx, inv.ID, sinv, hosted)
}

// replaceCustomer makes the account a new Stripe customer in place of
// gone, which Stripe no longer has, and returns the customer recorded in
// its place (another instance's, if it recorded one first). The key names
// the customer replaced, so a retry, or another instance, asks for the same
// customer; the search for one an earlier attempt made skips deleted ones.
func (iv *Invoicer) replaceCustomer(ctx context.Context, a Account, gone string) (string, error) {
	// Stripe answers "No such customer" for a key of the other mode or of
	// another Stripe account too: only a customer Stripe holds as deleted
	// is replaced, or a key set by mistake would give every account a new
	// customer.
	deleted, err := iv.stripe.CustomerDeleted(ctx, gone)
	if errors.Is(err, ErrStripeCustomerUnknown) {
		return "", fmt.Errorf("the account's Stripe customer %s is unknown to this Stripe key (a key of the other mode, or of another Stripe account?), so it is not replaced: %w", gone, err)
	}
	if err != nil {
		return "", fmt.Errorf("read the account's Stripe customer %s: %w", gone, err)
	}
	if !deleted {
		return "", fmt.Errorf("Stripe refused an invoice for customer %s, which it holds and has not deleted; not replaced: %w", gone, ErrStripeCustomerGone)
	}
	cust, err := iv.stripe.EnsureCustomer(ctx, CustomerParams{AccountID: a.ID, Name: a.Name,
		Email: a.Email, IdempotencyKey: customerKey(a.ID) + ":replaces:" + gone})
	if err != nil {
		return "", fmt.Errorf("customer in place of %s: %w", gone, err)
	}
	if cust == gone {
		return "", fmt.Errorf("customer in place of %s: Stripe's search still finds it: %w", gone, ErrStripeCustomerGone)
	}
	if cust, err = iv.store.ReplaceStripeCustomer(ctx, a.ID, gone, cust); err != nil {
		return "", err
	}
	iv.log.Warn("the account's Stripe customer no longer exists in Stripe; its invoices go to a new customer from now on",
		"account", a.ID, "replaced", gone, "customer", cust)
	return cust, nil
}

func lineDescription(l Line, days dayZones) string {
	if l.Model == Flat {
		if l.Proration != "" {
			return fmt.Sprintf("%s (prorated %s)", l.Description, l.Proration)
		}
		return l.Description
	}
	return fmt.Sprintf("%s: %d units (%d billable) %s", l.Description, l.Quantity, l.Billable, days.of(l.Period))
}

// dayZones says in which zone each boundary of an invoice's lines is
// named: the invoice period's own start and end in the zone they were cut
// in, any other (a plan change) in the account's.
type dayZones struct {
	loc        *time.Location
	period     Period
	start, end *time.Location
}

// of names the days p covers, its first and its last: a period ends just
// before its End, so March is "2026-03-01 – 2026-03-31", not "–
// 2026-04-01", and a Tokyo account's March is not printed from its UTC
// start on 28 February.
func (z dayZones) of(p Period) string {
	const day = "2006-01-02"
	sl, el := z.loc, z.loc
	if p.Start.Equal(z.period.Start) {
		sl = z.start
	}
	if p.End.Equal(z.period.End) {
		el = z.end
	}
	last := p.End.In(el).Add(-time.Nanosecond)
	if !p.End.After(p.Start) {
		last = p.Start.In(sl)
	}
	return p.Start.In(sl).Format(day) + " – " + last.Format(day)
}

// cutZone is the zone a period boundary t was cut in: a period starts and
// ends at the first midnight of a month, in loc unless the account has
// changed zones since; then in the fixed offset (within UTC−12 to UTC+14)
// that makes t such a midnight, which names the same days as the zone it
// was cut in did. Two offsets a day apart can make t a midnight (UTC+13
// and UTC−11): the one that makes it the 1st is the zone's.
func cutZone(t time.Time, loc *time.Location) *time.Location {
	first := func(lt time.Time) bool {
		return lt.Day() == 1 && lt.Hour() == 0 && lt.Minute() == 0 && lt.Second() == 0
	}
	if first(t.In(loc)) {
		return loc
	}
	u := t.UTC()
	off := -(u.Hour()*3600 + u.Minute()*60 + u.Second())
	var fallback *time.Location
	for _, o := range []int{off, off + 24*3600, off - 24*3600} {
		if o < -12*3600 || o > 14*3600 {
			continue
		}
		z := time.FixedZone("", o)
		if first(t.In(z)) {
			return z
		}
		if fallback == nil {
			fallback = z
		}
	}
	if fallback == nil {
		return loc
	}
	return fallback
}

// WebhookEvent is a verified Stripe event about an invoice.
type WebhookEvent struct {
	ID       string
	Type     string
	ObjectID string
	// InvoiceID is the ledger invoice the event is about (from the Stripe
	// invoice's metadata), "" when unknown.
	InvoiceID string
	AccountID string
	Currency  string
	// Amount is the amount paid or due, in minor units, when relevant.
	Amount  int64
	Payload []byte
}

// WebhookVerifier checks a webhook's signature and decodes it.
type WebhookVerifier interface {
	Verify(payload []byte, signatureHeader string) (WebhookEvent, error)
}

// StripeAmount is an amount in the currency's ISO minor units as Stripe's
// API takes it. Stripe takes ISK in hundredths, though the króna has no
// minor unit (ISO): 100 is one króna there. It takes the three-decimal
// currencies in thousandths, but only in multiples of ten; an amount that
// is not is refused here, for the invoice to be corrected, rather than
// rounded away from the ledger.
func StripeAmount(minor int64, currency string) (int64, error) {
	switch currency {
	case "isk":
		if minor > math.MaxInt64/100 || minor < math.MinInt64/100 {
			return 0, fmt.Errorf("%w: %d isk in Stripe's hundredths", ErrOverflow, minor)
		}
		return minor * 100, nil
	case "kwd", "bhd", "omr", "jod", "tnd":
		if minor%10 != 0 {
			return 0, fmt.Errorf("%w: Stripe takes %s amounts in multiples of 10 (thousandths); %d is not", ErrInvalid, currency, minor)
		}
	}
	return minor, nil
}

// FromStripeAmount is an amount Stripe reports (a webhook's amount_paid)
// in the currency's ISO minor units: StripeAmount undone.
func FromStripeAmount(amount int64, currency string) int64 {
	if currency == "isk" {
		return amount / 100
	}
	return amount
}
