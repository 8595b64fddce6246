package stripe_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	if got := invs[0]; got.Status != "open" || got.AmountDue != 6900 || len(got.Items) != 2 ||
		got.Metadata["tollgate_invoice_id"] != "inv_202603_x" || fin.HostedURL == "" {
		t.Errorf("invoice after finalize: %+v (hosted %q)", got, fin.HostedURL)
	}
	if len(items) != 2 || items[0] == items[1] {
		t.Errorf("items: %v", items)
	}
	replayed := 0
	for _, call := range f.Calls() {
		if call.IdempotencyKey == "" {
			t.Errorf("%s call without an idempotency key", call.Kind)
		}
		if call.Replayed {
			replayed++
		}
	}
	if replayed != 3 {
		t.Errorf("replayed calls: got %d, want 3", replayed)
	}
	// Same key, other parameters: refused, as Stripe does.
	_, err := c.CreateInvoiceItem(context.Background(), invoicer.InvoiceItemParams{CustomerID: cus, StripeInvoiceID: inv,
		Currency: "usd", Amount: 1, InvoiceID: "inv_202603_x", LineNo: 1, IdempotencyKey: "fake:item:1"})
	if err == nil || !strings.Contains(err.Error(), "idempotent") {
		t.Errorf("reused key with other parameters: got %v", err)
	}
	// Finalizing twice with a new key is an error: the invoice is open.
	if _, err := c.FinalizeInvoice(context.Background(), inv, "other"); err == nil {
		t.Error("second finalize with a fresh key succeeded")
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
