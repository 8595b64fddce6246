package stripe_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/invoicer/stripe"
	"github.com/tollgate-dev/tollgate/invoicer/stripe/stripetest"
)

// suite is the behaviour every implementation behind invoicer.Stripe must
// show: the whole invoice flow succeeds with well-formed requests, and a
// repeated call with the same idempotency key is accepted, and (for a
// stateful implementation; stripe-mock ignores idempotency keys) returns
// the object the first call made.
func suite(t *testing.T, s invoicer.Stripe, key string, stateful bool) (customer, invoice string, items []string, fin invoicer.FinalizedInvoice) {
	t.Helper()
	ctx := context.Background()
	cus, err := s.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: "acct_1", Name: "Acme", Email: "billing@acme.test", IdempotencyKey: key + ":customer"})
	testenv.Must(t, err, "create customer")
	again, err := s.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: "acct_1", Name: "Acme", Email: "billing@acme.test", IdempotencyKey: key + ":customer"})
	testenv.Must(t, err, "repeat create customer")
	if stateful && again != cus {
		t.Fatalf("the same idempotency key gave customers %s and %s", cus, again)
	}
	if deleted, err := s.CustomerDeleted(ctx, cus); err != nil || deleted {
		t.Fatalf("the customer just made reads as deleted: %v, %v", deleted, err)
	}
	inv, err := s.CreateInvoice(ctx, invoicer.InvoiceParams{CustomerID: cus, Currency: "usd", InvoiceID: "inv_202603_x", Description: "March", IdempotencyKey: key + ":invoice"})
	testenv.Must(t, err, "create invoice")
	for i, amt := range []int64{2900, 4000} {
		p := invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv, Currency: "usd", Amount: amt,
			Description: fmt.Sprintf("line %d", i+1), InvoiceID: "inv_202603_x", LineNo: i + 1, IdempotencyKey: fmt.Sprintf("%s:item:%d", key, i+1)}
		id, err := s.CreateInvoiceItem(ctx, p)
		testenv.Must(t, err, "create item")
		items = append(items, id)
		_, err = s.CreateInvoiceItem(ctx, p)
		testenv.Must(t, err, "repeat create item")
	}
	fin, err = s.FinalizeInvoice(ctx, inv, key+":finalize")
	testenv.Must(t, err, "finalize")
	if fin.ID == "" {
		t.Fatal("finalize returned no invoice id")
	}
	cn, err := s.CreateCreditNote(ctx, invoicer.CreditNoteParams{StripeInvoiceID: inv, Amount: 500, Reason: "goodwill",
		CreditNoteID: 42, InvoiceID: "inv_202603_x", IdempotencyKey: key + ":credit_note:42"})
	testenv.Must(t, err, "create credit note")
	if cn == "" {
		t.Fatal("credit note without an id")
	}
	return cus, inv, items, fin
}

func TestStripeMockAcceptsEveryRequest(t *testing.T) {
	url := testenv.RequireStripeMock(t)
	c := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: url})
	suite(t, c, "mock-"+testenv.Name(t), false)
}

func TestFakeKeepsStateAndHonoursIdempotencyKeys(t *testing.T) {
	f := stripetest.New()
	defer f.Close()
	c := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	cus, inv, items, fin := suite(t, c, "fake", true)
	if f.Customers() != 1 {
		t.Errorf("customers: got %d, want 1 (the repeat was idempotent)", f.Customers())
	}
	invs := f.Invoices()
	if len(invs) != 1 || invs[0].ID != inv || invs[0].Customer != cus {
		t.Fatalf("invoices: %+v", invs)
	}
	if cns := f.CreditNotes(); len(cns) != 1 || cns[0].Amount != 500 || cns[0].Type != "pre_payment" || cns[0].Metadata["tollgate_credit_note_id"] != "42" {
		t.Errorf("credit notes: %+v, want one of 500 before payment", cns)
	}
	if got := invs[0]; got.Status != "open" || got.AmountDue != 6400 || len(got.Items) != 2 ||
		got.Metadata["tollgate_invoice_id"] != "inv_202603_x" || fin.HostedURL == "" {
		t.Errorf("invoice after finalize: %+v (hosted %q)", got, fin.HostedURL)
	}
	if len(items) != 2 || items[0] == items[1] {
		t.Errorf("items: %v", items)
	}
	// The repeats found what the first calls made (by metadata) and sent
	// no second create; every create carried an idempotency key.
	creates := 0
	for _, call := range f.Calls() {
		switch call.Kind {
		case "customer", "invoice", "item", "finalize":
			creates++
			if call.IdempotencyKey == "" || call.Replayed {
				t.Errorf("%s call: %+v, want a first use of an idempotency key", call.Kind, call)
			}
		}
	}
	if creates != 5 {
		t.Errorf("create and finalize calls: got %d, want 5 (customer, invoice, 2 items, finalize)", creates)
	}
	// A line the invoice does not have, under a key already used for
	// another request: refused, as Stripe does.
	_, err := c.CreateInvoiceItem(context.Background(), invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv,
		Currency: "usd", Amount: 1, InvoiceID: "inv_202603_x", LineNo: 3, IdempotencyKey: "fake:item:1"})
	if err == nil || !strings.Contains(err.Error(), "idempotent") {
		t.Errorf("reused key with other parameters: got %v", err)
	}
	// Finalizing again with a fresh key reports the invoice as it stands
	// (Stripe refuses the finalize itself: the invoice is open).
	again, err := c.FinalizeInvoice(context.Background(), inv, "other")
	if err != nil || again.ID != inv || again.Status != "open" {
		t.Errorf("second finalize with a fresh key: %+v, %v; want the open invoice", again, err)
	}
	// An item for a line the invoice has, under a new key, is that item.
	if id, err := c.CreateInvoiceItem(context.Background(), invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv,
		Currency: "usd", Amount: 2900, InvoiceID: "inv_202603_x", LineNo: 1, IdempotencyKey: "fresh:item:1"}); err != nil || id != items[0] {
		t.Errorf("item 1 again under a fresh key: %s, %v; want %s", id, err, items[0])
	}
}

// A sync that stopped after each Stripe create and before the ledger's
// record of it, resumed after Stripe has forgotten the idempotency keys
// (about 24 hours), finds what the first attempt made instead of making it
// again: one customer, one invoice, one item per line, one finalize. Before,
// the resumed item create made a second item, and the customer was
// charged for the line twice.
func TestAResumedSyncFindsWhatItMadeAfterTheKeysExpired(t *testing.T) {
	f := stripetest.New()
	defer f.Close()
	c := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	ctx := context.Background()

	cp := invoicer.CustomerParams{AccountID: "acct_o'neil", Name: "O'Neil", IdempotencyKey: "tollgate:customer:acct_o'neil"}
	cus, err := c.EnsureCustomer(ctx, cp)
	testenv.Must(t, err, "create customer")
	f.ForgetIdempotencyKeys()
	again, err := c.EnsureCustomer(ctx, cp)
	testenv.Must(t, err, "resume: customer")
	if again != cus || f.Customers() != 1 {
		t.Errorf("customer %s then %s, %d customers; want one", cus, again, f.Customers())
	}
	// Another account's customer is not taken for this one.
	other, err := c.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: "acct_other", IdempotencyKey: "tollgate:customer:acct_other"})
	testenv.Must(t, err, "create another customer")
	if other == cus {
		t.Fatal("another account got the first account's customer")
	}

	ip := invoicer.InvoiceParams{CustomerID: cus, Currency: "eur", InvoiceID: "inv_2026_10_a", Description: "October", IdempotencyKey: "tollgate:inv_2026_10_a:invoice"}
	inv, err := c.CreateInvoice(ctx, ip)
	testenv.Must(t, err, "create invoice")
	f.ForgetIdempotencyKeys()
	invAgain, err := c.CreateInvoice(ctx, ip)
	testenv.Must(t, err, "resume: invoice")
	// The same customer's next invoice is a new one.
	next := ip
	next.InvoiceID, next.IdempotencyKey = "inv_2026_11_a", "tollgate:inv_2026_11_a:invoice"
	nextInv, err := c.CreateInvoice(ctx, next)
	testenv.Must(t, err, "create the next invoice")
	if invAgain != inv || nextInv == inv || len(f.Invoices()) != 2 {
		t.Fatalf("invoices %s, %s, next %s; fake holds %d, want 2", inv, invAgain, nextInv, len(f.Invoices()))
	}

	var first []string
	for no, amt := range []int64{1500, 700} {
		p := invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv, Currency: "eur", Amount: amt,
			Description: fmt.Sprintf("line %d", no+1), InvoiceID: ip.InvoiceID, LineNo: no + 1,
			IdempotencyKey: fmt.Sprintf("tollgate:%s:item:%d", ip.InvoiceID, no+1)}
		id, err := c.CreateInvoiceItem(ctx, p)
		testenv.Must(t, err, "create item")
		f.ForgetIdempotencyKeys()
		idAgain, err := c.CreateInvoiceItem(ctx, p)
		testenv.Must(t, err, "resume: item")
		if idAgain != id {
			t.Errorf("line %d: items %s then %s, want one", no+1, id, idAgain)
		}
		first = append(first, id)
	}
	fin, err := c.FinalizeInvoice(ctx, inv, "tollgate:"+ip.InvoiceID+":finalize")
	testenv.Must(t, err, "finalize")
	f.ForgetIdempotencyKeys()
	finAgain, err := c.FinalizeInvoice(ctx, inv, "tollgate:"+ip.InvoiceID+":finalize")
	testenv.Must(t, err, "resume: finalize")
	if finAgain.ID != fin.ID || finAgain.Status != "open" || finAgain.HostedURL != fin.HostedURL {
		t.Errorf("finalize %+v then %+v, want the same open invoice", fin, finAgain)
	}
	got := f.Invoices()[0]
	if got.ID != inv || len(got.Items) != 2 || got.AmountDue != 2200 || got.Items[0].ID != first[0] || got.Items[1].ID != first[1] {
		t.Errorf("Stripe holds %+v, want items %v totalling 2200", got, first)
	}
	// A draft that does not exist is still an error, not a finalized invoice.
	if _, err := c.FinalizeInvoice(ctx, "in_missing", "tollgate:missing:finalize"); err == nil {
		t.Error("finalizing a missing invoice succeeded")
	}
	// A credit note, resumed after the keys expired, is not made twice;
	// on a paid invoice it goes to the customer's balance.
	np := invoicer.CreditNoteParams{StripeInvoiceID: inv, Amount: 300, Reason: "outage", CreditNoteID: 7,
		InvoiceID: ip.InvoiceID, IdempotencyKey: "tollgate:" + ip.InvoiceID + ":credit_note:7"}
	f.Pay(inv)
	cn, err := c.CreateCreditNote(ctx, np)
	testenv.Must(t, err, "credit note")
	f.ForgetIdempotencyKeys()
	cnAgain, err := c.CreateCreditNote(ctx, np)
	testenv.Must(t, err, "resume: credit note")
	if cns := f.CreditNotes(); cnAgain != cn || len(cns) != 1 || cns[0].Type != "post_payment" || cns[0].CreditAmount != 300 {
		t.Errorf("credit notes %s then %s: %+v, want one of 300 to the balance", cn, cnAgain, cns)
	}
	// Items are listed once per invoice, not once per line.
	lists := 0
	for _, call := range f.Calls() {
		if call.Kind == "list_items" {
			lists++
		}
	}
	if lists != 1 {
		t.Errorf("invoice items listed %d times for one invoice, want once", lists)
	}
	// An invoice voided by hand in Stripe is not taken as finalized.
	fresh, err := c.CreateInvoice(ctx, next)
	testenv.Must(t, err, "find the next invoice")
	f.Void(fresh)
	if fin, err := c.FinalizeInvoice(ctx, fresh, "tollgate:"+next.InvoiceID+":finalize"); err == nil {
		t.Errorf("finalizing a voided invoice: %+v, want an error", fin)
	}
}

func TestWebhookSignatures(t *testing.T) {
	v := &stripe.Verifier{Secret: "whsec_test"}
	payload := []byte(`{"id":"evt_1","object":"event","type":"invoice.paid","api_version":"2023-10-16",
		"data":{"object":{"id":"in_1","object":"invoice","currency":"usd","amount_paid":6900,"amount_due":6900,
		"metadata":{"tollgate_invoice_id":"inv_202603_x"}}}}`)
	signed := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_test"})
	t.Run("a correctly signed event is decoded with its ledger invoice", func(t *testing.T) {
		ev, err := v.Verify(signed.Payload, signed.Header)
		testenv.Must(t, err, "verify")
		if ev.ID != "evt_1" || ev.Type != "invoice.paid" || ev.InvoiceID != "inv_202603_x" || ev.Amount != 6900 || ev.ObjectID != "in_1" {
			t.Errorf("event: %+v", ev)
		}
	})
	// Text Postgres cannot store would fail every delivery with a 500: it
	// is kept as text that says so, and matches no invoice.
	t.Run("a NUL in its ids is replaced", func(t *testing.T) {
		nul := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Secret: "whsec_test",
			Payload: []byte(strings.NewReplacer(`"in_1"`, `"in_\u0000"`, `"inv_202603_x"`, `"inv_\u0000x"`).Replace(string(payload)))})
		ev, err := v.Verify(nul.Payload, nul.Header)
		testenv.Must(t, err, "verify")
		if ev.ObjectID != "in_\uFFFD" || ev.InvoiceID != "inv_\uFFFDx" {
			t.Errorf("object %q, invoice %q; want the NULs replaced", ev.ObjectID, ev.InvoiceID)
		}
	})
	t.Run("another secret is rejected", func(t *testing.T) {
		bad := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_other"})
		if _, err := v.Verify(bad.Payload, bad.Header); !errors.Is(err, invoicer.ErrUnauthorized) {
			t.Errorf("got %v", err)
		}
	})
	t.Run("a tampered payload is rejected", func(t *testing.T) {
		tampered := []byte(strings.Replace(string(payload), "6900", "1", 2))
		if _, err := v.Verify(tampered, signed.Header); !errors.Is(err, invoicer.ErrUnauthorized) {
			t.Errorf("got %v", err)
		}
	})
	t.Run("an old signature is rejected", func(t *testing.T) {
		old := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_test", Timestamp: time.Now().Add(-time.Hour)})
		if _, err := v.Verify(old.Payload, old.Header); !errors.Is(err, invoicer.ErrUnauthorized) {
			t.Errorf("got %v", err)
		}
	})
}

// A credit note for more than an open invoice still has due (a customer
// balance took part of it at finalization) lowers what is due to zero and
// sends the rest to the customer's balance, instead of being refused on
// every sync.
func TestACreditNoteBeyondWhatIsDueGoesToTheBalance(t *testing.T) {
	f := stripetest.New()
	defer f.Close()
	c := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	ctx := context.Background()
	inv := finalizedInvoice(t, c, "acct_bal", "inv_bal")
	var err error
	f.ApplyBalance(inv, 250)
	_, err = c.CreateCreditNote(ctx, invoicer.CreditNoteParams{StripeInvoiceID: inv, Amount: 1000, Reason: "all of it",
		CreditNoteID: 9, InvoiceID: "inv_bal", IdempotencyKey: "tollgate:inv_bal:credit_note:9"})
	testenv.Must(t, err, "credit the whole invoice")
	cns := f.CreditNotes()
	if len(cns) != 1 || cns[0].Amount != 1000 || cns[0].CreditAmount != 250 {
		t.Errorf("credit notes %+v, want 1000 with 250 to the balance", cns)
	}
	if got := f.Invoices()[0]; got.AmountDue != 0 {
		t.Errorf("due after crediting everything: %d, want 0", got.AmountDue)
	}
}

// Two invoicers crediting the same ledger credit note at once make one
// Stripe credit note, even when the invoice is paid between them: the
// second, which read the invoice as paid, would credit the balance too,
// under a key of its own, and the customer got the credit twice.
func TestTwoInvoicersCreditingAtOnceMakeOneCreditNote(t *testing.T) {
	f := stripetest.New()
	defer f.Close()
	a := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	b := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	ctx := context.Background()
	inv := finalizedInvoice(t, a, "acct_race", "inv_race")
	np := invoicer.CreditNoteParams{StripeInvoiceID: inv, Amount: 400, Reason: "outage", CreditNoteID: 7,
		InvoiceID: "inv_race", IdempotencyKey: "tollgate:inv_race:credit_note:7"}

	// B lists the invoice's credit notes (none yet) and is held there
	// while A credits the open invoice and the customer pays.
	listed, resume := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	f.SetHook(func(kind, phase string) {
		if kind == "list_credit_notes" && phase == "after" && first.CompareAndSwap(false, true) {
			close(listed)
			<-resume
		}
	})
	type result struct {
		id  string
		err error
	}
	fromB := make(chan result, 1)
	go func() {
		id, err := b.CreateCreditNote(ctx, np)
		fromB <- result{id, err}
	}()
	<-listed
	idA, err := a.CreateCreditNote(ctx, np)
	testenv.Must(t, err, "A credits the open invoice")
	f.Pay(inv)
	close(resume)
	rb := <-fromB
	testenv.Must(t, rb.err, "B credits the invoice it read as paid")
	cns := f.CreditNotes()
	if len(cns) != 1 || rb.id != idA || cns[0].Amount != 400 || cns[0].Type != "pre_payment" {
		t.Fatalf("A made %s, B answered %s; Stripe holds %+v; want one pre-payment credit note of 400, answered to both", idA, rb.id, cns)
	}
}

// A credit note Stripe refused keeps its refusal under its idempotency key
// for a day. When the invoice has changed since (a customer balance took
// part of what was due), the next try sends other parameters, which the
// same key would only be refused again for: with no credit note of its
// own listed, it goes under a key that names where the credit goes.
func TestACreditNoteRefusedOnceIsSentAgainWhenTheInvoiceChanged(t *testing.T) {
	f := stripetest.New()
	defer f.Close()
	c := stripe.New(stripe.Config{APIKey: "sk_test_123", URL: f.URL})
	ctx := context.Background()
	inv := finalizedInvoice(t, c, "acct_refused", "inv_refused")
	np := invoicer.CreditNoteParams{StripeInvoiceID: inv, Amount: 1000, Reason: "all of it", CreditNoteID: 9,
		InvoiceID: "inv_refused", IdempotencyKey: "tollgate:inv_refused:credit_note:9"}
	// A balance applied between the first try's read and its request: the
	// request credits more than is left due, and Stripe refuses it.
	var first atomic.Bool
	f.SetHook(func(kind, phase string) {
		if kind == "credit_note" && phase == "before" && first.CompareAndSwap(false, true) {
			f.ApplyBalance(inv, 250)
		}
	})
	if _, err := c.CreateCreditNote(ctx, np); err == nil {
		t.Fatal("the first try succeeded; the test needs Stripe to refuse it")
	}
	id, err := c.CreateCreditNote(ctx, np)
	testenv.Must(t, err, "the next try")
	cns := f.CreditNotes()
	if len(cns) != 1 || cns[0].ID != id || cns[0].Amount != 1000 || cns[0].CreditAmount != 250 {
		t.Errorf("credit notes %+v (answered %s), want one of 1000 with 250 to the balance", cns, id)
	}
}

// finalizedInvoice makes account's Stripe customer and a finalized Stripe
// invoice of 1,000 for ledger invoice id, and returns its Stripe id.
func finalizedInvoice(t *testing.T, c *stripe.Client, account, id string) string {
	t.Helper()
	ctx := context.Background()
	cus, err := c.EnsureCustomer(ctx, invoicer.CustomerParams{AccountID: account, IdempotencyKey: "tollgate:customer:" + account})
	testenv.Must(t, err, "customer")
	inv, err := c.CreateInvoice(ctx, invoicer.InvoiceParams{CustomerID: cus, Currency: "usd", InvoiceID: id, IdempotencyKey: "tollgate:" + id + ":invoice"})
	testenv.Must(t, err, "invoice")
	_, err = c.CreateInvoiceItem(ctx, invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv, Currency: "usd", Amount: 1000,
		InvoiceID: id, LineNo: 1, IdempotencyKey: "tollgate:" + id + ":item:1"})
	testenv.Must(t, err, "item")
	_, err = c.FinalizeInvoice(ctx, inv, "tollgate:"+id+":finalize")
	testenv.Must(t, err, "finalize")
	return inv
}
