// Package stripe implements the invoicer's Stripe interface with stripe-go
// and verifies Stripe webhooks.
package stripe

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	stripego "github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/tollgate-dev/tollgate/invoicer"
)

// Client talks to the Stripe API (or anything that speaks it, such as
// stripe-mock or a test fake) through its own client.API: no package-level
// state, so several clients with different keys and URLs can coexist.
type Client struct {
	api *client.API

	// mu guards the items last listed (itemOn).
	mu      sync.Mutex
	itemsOf string
	itemsAt time.Time
	items   map[string]string
}

var _ invoicer.Stripe = (*Client)(nil)

// Config says which Stripe to reach and as whom.
type Config struct {
	// APIKey is the secret key (sk_live_… bills, sk_test_… does not).
	APIKey string
	// URL overrides the API base URL ("" = Stripe itself).
	URL string
	// HTTPClient overrides the HTTP client (timeouts).
	HTTPClient *http.Client
}

// New returns a Client.
func New(cfg Config) *Client {
	bc := &stripego.BackendConfig{MaxNetworkRetries: stripego.Int64(2), LeveledLogger: &stripego.LeveledLogger{Level: stripego.LevelNull}}
	if cfg.URL != "" {
		bc.URL = stripego.String(cfg.URL)
	}
	hc := cfg.HTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	bc.HTTPClient = hc
	backend := stripego.GetBackendWithConfig(stripego.APIBackend, bc)
	api := &client.API{}
	api.Init(cfg.APIKey, &stripego.Backends{API: backend, Connect: backend, Uploads: backend})
	return &Client{api: api}
}

func params(ctx context.Context, key string, meta map[string]string) stripego.Params {
	p := stripego.Params{Context: ctx}
	p.SetIdempotencyKey(key)
	for k, v := range meta {
		p.AddMetadata(k, v)
	}
	return p
}

// Stripe keeps an idempotency key for about 24 hours. A sync that stopped
// between a create and the ledger's record of it, and resumes later than
// that, would make a second object with the same key: a second item on an
// invoice is a customer charged twice for the line. So each create first
// looks for the object an earlier attempt made, by the ledger ids in its
// metadata, and the idempotency key covers the window in which that lookup
// may not see it yet (search is eventually consistent; lists are not).

// EnsureCustomer returns the account's customer: one an earlier attempt
// made (found by metadata), or a new one.
func (c *Client) EnsureCustomer(ctx context.Context, p invoicer.CustomerParams) (string, error) {
	sp := &stripego.CustomerSearchParams{SearchParams: stripego.SearchParams{Context: ctx,
		Query: "metadata['tollgate_account_id']:'" + quote(p.AccountID) + "'"}}
	found := c.api.Customers.Search(sp)
	for found.Next() {
		if cus := found.Customer(); cus.Metadata["tollgate_account_id"] == p.AccountID && !cus.Deleted {
			return cus.ID, nil
		}
	}
	if err := found.Err(); err != nil && !searchUnavailable(err) {
		return "", fmt.Errorf("search stripe customers: %w", err)
	}
	// Search is not offered everywhere (Stripe refuses it with a 400
	// then); without it a customer made more than 24 hours before a
	// resumed sync is made again. That costs a stray customer, not a
	// second charge.
	cp := &stripego.CustomerParams{Params: params(ctx, p.IdempotencyKey, map[string]string{"tollgate_account_id": p.AccountID})}
	if p.Name != "" {
		cp.Name = stripego.String(p.Name)
	}
	if p.Email != "" {
		cp.Email = stripego.String(p.Email)
	}
	cus, err := c.api.Customers.New(cp)
	if err != nil {
		return "", fmt.Errorf("create stripe customer: %w", err)
	}
	return cus.ID, nil
}

// CustomerDeleted reads the customer: Stripe answers a deleted one's id
// with {"deleted": true}, and one it never had (another mode's or
// account's) with resource_missing, which is returned as an error.
func (c *Client) CustomerDeleted(ctx context.Context, customerID string) (bool, error) {
	cus, err := c.api.Customers.Get(customerID, &stripego.CustomerParams{Params: stripego.Params{Context: ctx}})
	var se *stripego.Error
	if errors.As(err, &se) && se.Code == stripego.ErrorCodeResourceMissing {
		return false, fmt.Errorf("read stripe customer %s: %w: %w", customerID, invoicer.ErrStripeCustomerUnknown, err)
	}
	if err != nil {
		return false, fmt.Errorf("read stripe customer %s: %w", customerID, err)
	}
	return cus.Deleted, nil
}

// searchUnavailable tells Stripe's refusal of search itself (a 400
// invalid request) from a failure worth retrying: a rate limit (429, which
// Stripe also types as an invalid request), a bad key, a network error.
func searchUnavailable(err error) bool {
	var se *stripego.Error
	return errors.As(err, &se) && se.HTTPStatusCode == http.StatusBadRequest &&
		se.Type == stripego.ErrorTypeInvalidRequest && se.Code != stripego.ErrorCodeRateLimit
}

// quote escapes a value for a Stripe search query's single quotes.
func quote(v string) string {
	return strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v)
}

// CreateInvoice returns the ledger invoice's Stripe invoice: one an earlier
// attempt made (found by metadata among the customer's invoices), or a new
// draft that takes only the items attached to it explicitly (never a
// customer's other pending items) and that Stripe does not finalize on its
// own: the invoicer finalizes it once every item is attached.
func (c *Client) CreateInvoice(ctx context.Context, p invoicer.InvoiceParams) (string, error) {
	lp := &stripego.InvoiceListParams{Customer: stripego.String(p.CustomerID)}
	lp.Context = ctx
	lp.Limit = stripego.Int64(100)
	found := c.api.Invoices.List(lp)
	for found.Next() {
		if inv := found.Invoice(); inv.Metadata["tollgate_invoice_id"] == p.InvoiceID {
			return inv.ID, nil
		}
	}
	if err := found.Err(); err != nil {
		return "", fmt.Errorf("list stripe invoices: %w", customerGone(err))
	}
	ip := &stripego.InvoiceParams{
		Params:                      params(ctx, p.IdempotencyKey, map[string]string{"tollgate_invoice_id": p.InvoiceID}),
		Customer:                    stripego.String(p.CustomerID),
		Currency:                    stripego.String(p.Currency),
		Description:                 stripego.String(p.Description),
		AutoAdvance:                 stripego.Bool(false),
		PendingInvoiceItemsBehavior: stripego.String("exclude"),
	}
	inv, err := c.api.Invoices.New(ip)
	if err != nil {
		return "", fmt.Errorf("create stripe invoice: %w", customerGone(err))
	}
	return inv.ID, nil
}

// customerGone marks Stripe's answer that the customer named does not
// exist (it was deleted) with invoicer.ErrStripeCustomerGone.
func customerGone(err error) error {
	var se *stripego.Error
	if errors.As(err, &se) && se.Code == stripego.ErrorCodeResourceMissing && se.Param == "customer" {
		return fmt.Errorf("%w: %w", invoicer.ErrStripeCustomerGone, err)
	}
	return err
}

// CreateInvoiceItem attaches one line to a draft invoice, unless an earlier
// attempt did (found by metadata among the invoice's items).
func (c *Client) CreateInvoiceItem(ctx context.Context, p invoicer.InvoiceItemParams) (string, error) {
	key := p.InvoiceID + "\x00" + strconv.Itoa(p.LineNo)
	id, found, err := c.itemOn(ctx, p.StripeInvoiceID, key)
	if err != nil {
		return "", err
	}
	if found {
		return id, nil
	}
	ip := &stripego.InvoiceItemParams{
		Params: params(ctx, p.IdempotencyKey, map[string]string{
			"tollgate_invoice_id": p.InvoiceID, "tollgate_line_no": strconv.Itoa(p.LineNo)}),
		Customer:    stripego.String(p.CustomerID),
		Invoice:     stripego.String(p.StripeInvoiceID),
		Currency:    stripego.String(p.Currency),
		Amount:      stripego.Int64(p.Amount),
		Description: stripego.String(p.Description),
	}
	it, err := c.api.InvoiceItems.New(ip)
	if err != nil {
		// Stripe may have made it all the same (an answer lost on the
		// way): list again next time.
		c.mu.Lock()
		c.itemsOf, c.items = "", nil
		c.mu.Unlock()
		return "", fmt.Errorf("create stripe invoice item: %w", err)
	}
	c.mu.Lock()
	if c.itemsOf == p.StripeInvoiceID && c.items != nil {
		c.items[key] = it.ID
	}
	c.mu.Unlock()
	return it.ID, nil
}

// itemListTTL is how long an invoice's listed items are trusted: a sync
// adds its items one after another, within seconds; a later run lists
// again (an item may have been deleted in Stripe meanwhile).
const itemListTTL = time.Minute

// itemOn finds the item for key (ledger invoice id and line number) on a
// Stripe invoice. The invoice's items are listed once and kept, for the
// invoice last asked about, for itemListTTL.
func (c *Client) itemOn(ctx context.Context, stripeInvoiceID, key string) (string, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.itemsOf != stripeInvoiceID || c.items == nil || time.Since(c.itemsAt) > itemListTTL {
		made, err := c.listItems(ctx, stripeInvoiceID)
		if err != nil {
			return "", false, err
		}
		c.itemsOf, c.items, c.itemsAt = stripeInvoiceID, made, time.Now()
	}
	id, ok := c.items[key]
	return id, ok, nil
}

// listItems lists a Stripe invoice's items by ledger invoice id and line.
func (c *Client) listItems(ctx context.Context, stripeInvoiceID string) (map[string]string, error) {
	lp := &stripego.InvoiceItemListParams{Invoice: stripego.String(stripeInvoiceID)}
	lp.Context = ctx
	lp.Limit = stripego.Int64(100)
	found := c.api.InvoiceItems.List(lp)
	made := map[string]string{}
	for found.Next() {
		it := found.InvoiceItem()
		if inv, line := it.Metadata["tollgate_invoice_id"], it.Metadata["tollgate_line_no"]; inv != "" && line != "" {
			made[inv+"\x00"+line] = it.ID
		}
	}
	if err := found.Err(); err != nil {
		return nil, fmt.Errorf("list stripe invoice items: %w", err)
	}
	return made, nil
}

// FinalizeInvoice finalizes a draft invoice. An invoice an earlier attempt
// finalized (Stripe refuses a second finalize once the idempotency key has
// expired) is reported as it stands if it is open, paid or uncollectible;
// a voided one is an error.
func (c *Client) FinalizeInvoice(ctx context.Context, id, key string) (invoicer.FinalizedInvoice, error) {
	fp := &stripego.InvoiceFinalizeInvoiceParams{Params: params(ctx, key, nil), AutoAdvance: stripego.Bool(true)}
	inv, err := c.api.Invoices.FinalizeInvoice(id, fp)
	if err != nil {
		var se *stripego.Error
		if !errors.As(err, &se) || se.HTTPStatusCode >= 500 {
			return invoicer.FinalizedInvoice{}, fmt.Errorf("finalize stripe invoice %s: %w", id, err)
		}
		now, gerr := c.api.Invoices.Get(id, &stripego.InvoiceParams{Params: stripego.Params{Context: ctx}})
		if gerr != nil {
			return invoicer.FinalizedInvoice{}, fmt.Errorf("finalize stripe invoice %s: %w", id, err)
		}
		switch now.Status {
		case stripego.InvoiceStatusOpen, stripego.InvoiceStatusPaid, stripego.InvoiceStatusUncollectible:
			inv = now
		default:
			// Still a draft (refused for another reason), or voided by
			// hand: not what the ledger may record as billed.
			return invoicer.FinalizedInvoice{}, fmt.Errorf("finalize stripe invoice %s (now %s): %w", id, now.Status, err)
		}
	}
	return invoicer.FinalizedInvoice{ID: inv.ID, Status: string(inv.Status), HostedURL: inv.HostedInvoiceURL}, nil
}

// CreateCreditNote credits part of a finalized invoice, unless an earlier
// attempt did (found by metadata among the invoice's credit notes). On a
// paid invoice the credit goes to the customer's balance.
//
// Every attempt sends the credit note's own idempotency key, whatever it
// read of the invoice: two invoicers crediting at once, the invoice paid
// between them, would otherwise send two keys (one crediting what is due,
// one the balance) and make two credit notes. Stripe refuses the second
// under the same key with other parameters; the credit notes are then
// listed again, and the first one's is the answer.
func (c *Client) CreateCreditNote(ctx context.Context, p invoicer.CreditNoteParams) (string, error) {
	want := strconv.FormatInt(p.CreditNoteID, 10)
	if id, err := c.findCreditNote(ctx, p.StripeInvoiceID, want); id != "" || err != nil {
		return id, err
	}
	inv, err := c.api.Invoices.Get(p.StripeInvoiceID, &stripego.InvoiceParams{Params: stripego.Params{Context: ctx}})
	if err != nil {
		return "", fmt.Errorf("read stripe invoice %s: %w", p.StripeInvoiceID, err)
	}
	// What Stripe can take off what is still due lowers it; the rest (all
	// of it on a paid invoice; on an open one, what a customer balance
	// applied at finalization already took off) goes to the customer's
	// balance, for their next invoice.
	var toBalance int64
	switch inv.Status {
	case stripego.InvoiceStatusPaid:
		toBalance = p.Amount
	case stripego.InvoiceStatusOpen:
		toBalance = max(0, p.Amount-inv.AmountRemaining)
	}
	create := func(key string) (string, error) {
		cp := &stripego.CreditNoteParams{
			Params: params(ctx, key, map[string]string{
				"tollgate_credit_note_id": want, "tollgate_invoice_id": p.InvoiceID}),
			Invoice: stripego.String(p.StripeInvoiceID),
			Amount:  stripego.Int64(p.Amount),
		}
		if p.Reason != "" {
			cp.Memo = stripego.String(p.Reason)
		}
		if toBalance > 0 {
			cp.CreditAmount = stripego.Int64(toBalance)
		}
		cn, err := c.api.CreditNotes.New(cp)
		if err != nil {
			return "", err
		}
		return cn.ID, nil
	}
	id, err := create(p.IdempotencyKey)
	var se *stripego.Error
	if err == nil || !errors.As(err, &se) || se.Type != stripego.ErrorTypeIdempotency {
		if err != nil {
			return "", fmt.Errorf("create stripe credit note on %s: %w", p.StripeInvoiceID, err)
		}
		return id, nil
	}
	// The key was used with other parameters: by another invoicer, whose
	// credit note is listed now, or by an earlier attempt of this one
	// that made none (Stripe refused it, and keeps the refusal under the
	// key for a day). Only then is it sent under a key that names where
	// the credit goes. A key in use by a request still running (not a
	// 400) is left for the next try, when that request's credit note is
	// listed.
	if id, lerr := c.findCreditNote(ctx, p.StripeInvoiceID, want); id != "" || lerr != nil {
		return id, lerr
	}
	if se.HTTPStatusCode != http.StatusBadRequest {
		return "", fmt.Errorf("create stripe credit note on %s: %w", p.StripeInvoiceID, err)
	}
	if id, err = create(p.IdempotencyKey + ":balance:" + strconv.FormatInt(toBalance, 10)); err != nil {
		return "", fmt.Errorf("create stripe credit note on %s: %w", p.StripeInvoiceID, err)
	}
	return id, nil
}

// findCreditNote returns the id of the credit note of a Stripe invoice
// that ledger credit note want made, or "" if there is none.
func (c *Client) findCreditNote(ctx context.Context, invoice, want string) (string, error) {
	lp := &stripego.CreditNoteListParams{Invoice: stripego.String(invoice)}
	lp.Context = ctx
	lp.Limit = stripego.Int64(100)
	found := c.api.CreditNotes.List(lp)
	for found.Next() {
		if cn := found.CreditNote(); cn.Metadata["tollgate_credit_note_id"] == want {
			return cn.ID, nil
		}
	}
	if err := found.Err(); err != nil {
		return "", fmt.Errorf("list stripe credit notes: %w", err)
	}
	return "", nil
}

// Verifier checks webhook signatures with the endpoint's signing secret.
type Verifier struct {
	Secret string
	// Tolerance is how old a signature may be (default 5 minutes).
	Tolerance time.Duration
}

var _ invoicer.WebhookVerifier = (*Verifier)(nil)

// ErrSignature means the webhook was not signed with the endpoint's secret
// (or is too old to trust).
var ErrSignature = errors.New("invalid stripe webhook signature")

// Verify checks the Stripe-Signature header and decodes the event. Events
// about invoices carry the ledger invoice id from the invoice's metadata.
func (v *Verifier) Verify(payload []byte, header string) (invoicer.WebhookEvent, error) {
	tol := v.Tolerance
	if tol == 0 {
		tol = webhook.DefaultTolerance
	}
	ev, err := webhook.ConstructEventWithOptions(payload, header, v.Secret, webhook.ConstructEventOptions{
		Tolerance: tol, IgnoreAPIVersionMismatch: true})
	if err != nil {
		return invoicer.WebhookEvent{}, fmt.Errorf("%w: %w: %v", invoicer.ErrUnauthorized, ErrSignature, err)
	}
	out := invoicer.WebhookEvent{ID: ev.ID, Type: string(ev.Type), Payload: payload}
	if ev.Data != nil && len(ev.Data.Raw) > 0 {
		var obj struct {
			ID         string            `json:"id"`
			Object     string            `json:"object"`
			Currency   string            `json:"currency"`
			AmountPaid int64             `json:"amount_paid"`
			AmountDue  int64             `json:"amount_due"`
			Metadata   map[string]string `json:"metadata"`
		}
		if err := json.Unmarshal(ev.Data.Raw, &obj); err == nil {
			out.ObjectID, out.Currency = obj.ID, obj.Currency
			if obj.Object == "invoice" {
				out.InvoiceID = obj.Metadata["tollgate_invoice_id"]
				out.Amount = invoicer.FromStripeAmount(obj.AmountDue, obj.Currency)
				if ev.Type == "invoice.paid" {
					out.Amount = invoicer.FromStripeAmount(obj.AmountPaid, obj.Currency)
				}
			}
		}
	}
	// Text Postgres cannot store (a NUL, bytes that are not UTF-8) would
	// fail every delivery with a 500, and Stripe retries it for days: such
	// an id matches nothing, so it is kept as text that says so.
	for _, f := range []*string{&out.ID, &out.Type, &out.ObjectID, &out.Currency, &out.InvoiceID} {
		*f = storable(*f)
	}
	return out, nil
}

// storable is s with what Postgres's text refuses replaced by U+FFFD.
func storable(s string) string {
	if utf8.ValidString(s) && strings.IndexByte(s, 0) < 0 {
		return s
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}
