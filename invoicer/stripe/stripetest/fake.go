// Package stripetest is a stateful fake of the slice of the Stripe API the
// invoicer uses, served over HTTP so the real stripe-go client (and a real
// invoicer process) talks to it. Unlike stripe-mock it keeps state and
// honours idempotency keys as Stripe does: the same key with the same
// request returns the first response; the same key with a different request
// is an error.
package stripetest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Item is an invoice item as the fake holds it.
type Item struct {
	ID          string            `json:"id"`
	Object      string            `json:"object"`
	Customer    string            `json:"customer"`
	Invoice     string            `json:"invoice"`
	Amount      int64             `json:"amount"`
	Currency    string            `json:"currency"`
	Description string            `json:"description"`
	Metadata    map[string]string `json:"metadata"`
}

// Invoice is a Stripe invoice as the fake holds it.
type Invoice struct {
	ID               string            `json:"id"`
	Object           string            `json:"object"`
	Customer         string            `json:"customer"`
	Currency         string            `json:"currency"`
	Status           string            `json:"status"`
	Description      string            `json:"description,omitempty"`
	AmountDue        int64             `json:"amount_due"`
	AmountRemaining  int64             `json:"amount_remaining"`
	HostedInvoiceURL string            `json:"hosted_invoice_url,omitempty"`
	Metadata         map[string]string `json:"metadata"`
	Items            []Item            `json:"-"`
}

// CreditNote is a credit note as the fake holds it.
type CreditNote struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Invoice string `json:"invoice"`
	Amount  int64  `json:"amount"`
	// Type is pre_payment (the invoice was open: what is due drops) or
	// post_payment (it was paid: CreditAmount went to the balance).
	Type         string            `json:"type"`
	CreditAmount int64             `json:"-"`
	Memo         string            `json:"memo"`
	Metadata     map[string]string `json:"metadata"`
}

// Customer is a Stripe customer as the fake holds it.
type Customer struct {
	ID       string            `json:"id"`
	Object   string            `json:"object"`
	Name     string            `json:"name"`
	Email    string            `json:"email"`
	Metadata map[string]string `json:"metadata"`
	// Deleted is set by DeleteCustomer: Stripe keeps a deleted customer's
	// id, answering a read of it with {"deleted": true}.
	Deleted bool `json:"deleted,omitempty"`
}

type stored struct {
	request string
	status  int
	body    []byte
}

// Fake is the fake Stripe. Its state outlives any client process, so a
// killed invoicer resumes against the same state.
type Fake struct {
	URL string
	srv *httptest.Server

	mu        sync.Mutex
	seq       int
	customers map[string]*Customer
	invoices  map[string]*Invoice
	order     []string
	credits   []CreditNote
	idem      map[string]stored
	calls     []Call
	// hook, if set, runs for every API request before it is handled
	// ("before") and after its state change but before the response is
	// written ("after"). A crash test kills the client process here.
	hook func(kind, phase string)
}

// Call is one request the fake received.
type Call struct {
	Kind           string
	IdempotencyKey string
	Replayed       bool
}

// New starts a fake on a loopback port; it stops when close is called.
func New() *Fake {
	f := &Fake{customers: map[string]*Customer{}, invoices: map[string]*Invoice{}, idem: map[string]stored{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	f.URL = f.srv.URL
	return f
}

// DeleteCustomer deletes a customer, as Stripe's dashboard does: search
// no longer finds it, a read of it says it is deleted, and Stripe refuses
// new invoices for it.
func (f *Fake) DeleteCustomer(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c := f.customers[id]; c != nil {
		c.Deleted = true
	}
}

// Close stops the server.
func (f *Fake) Close() { f.srv.Close() }

// SetHook installs the crash hook (nil removes it).
func (f *Fake) SetHook(h func(kind, phase string)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hook = h
}

// ForgetIdempotencyKeys drops every idempotency key the fake holds, as
// Stripe does about 24 hours after a key's first use: a request repeated
// after that is a new request.
func (f *Fake) ForgetIdempotencyKeys() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.idem = map[string]stored{}
}

// Void marks an invoice void, as someone might in Stripe's dashboard.
func (f *Fake) Void(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if inv := f.invoices[id]; inv != nil {
		inv.Status = "void"
	}
}

// Pay marks an open invoice paid, as a successful charge would.
func (f *Fake) Pay(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if inv := f.invoices[id]; inv != nil && inv.Status == "open" {
		inv.Status, inv.AmountRemaining = "paid", 0
	}
}

// ApplyBalance takes amount off what an open invoice still has due, as
// Stripe does with a customer's credit balance when it finalizes one.
func (f *Fake) ApplyBalance(id string, amount int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if inv := f.invoices[id]; inv != nil && inv.Status == "open" {
		inv.AmountDue -= amount
		inv.AmountRemaining = inv.AmountDue
	}
}

// CreditNotes returns every credit note, in creation order.
func (f *Fake) CreditNotes() []CreditNote {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]CreditNote(nil), f.credits...)
}

// total is the sum of the invoice's items.
func (inv *Invoice) total() int64 {
	var t int64
	for _, it := range inv.Items {
		t += it.Amount
	}
	return t
}

// Invoices returns a copy of every invoice, in creation order.
func (f *Fake) Invoices() []Invoice {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Invoice, 0, len(f.order))
	for _, id := range f.order {
		inv := *f.invoices[id]
		inv.Items = append([]Item(nil), inv.Items...)
		out = append(out, inv)
	}
	return out
}

// Customers returns how many customers were made, deleted ones included
// (Stripe keeps a deleted customer's id).
func (f *Fake) Customers() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.customers)
}

// Calls returns every request received so far.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

func (f *Fake) id(prefix string) string {
	f.seq++
	return fmt.Sprintf("%s_fake%06d", prefix, f.seq)
}

func kindOf(r *http.Request) string {
	p := strings.TrimPrefix(r.URL.Path, "/v1/")
	switch {
	case r.Method == http.MethodPost && p == "customers":
		return "customer"
	case r.Method == http.MethodPost && p == "invoices":
		return "invoice"
	case r.Method == http.MethodPost && p == "invoiceitems":
		return "item"
	case r.Method == http.MethodPost && strings.HasPrefix(p, "invoices/") && strings.HasSuffix(p, "/finalize"):
		return "finalize"
	case r.Method == http.MethodGet && strings.HasPrefix(p, "invoices/"):
		return "get_invoice"
	case r.Method == http.MethodGet && p == "invoices":
		return "list_invoices"
	case r.Method == http.MethodGet && p == "invoiceitems":
		return "list_items"
	case r.Method == http.MethodGet && p == "customers/search":
		return "search_customers"
	case r.Method == http.MethodGet && strings.HasPrefix(p, "customers/"):
		return "get_customer"
	case r.Method == http.MethodPost && p == "credit_notes":
		return "credit_note"
	case r.Method == http.MethodGet && p == "credit_notes":
		return "list_credit_notes"
	}
	return "unknown"
}

func (f *Fake) serve(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer sk_") {
		writeErr(w, http.StatusUnauthorized, "authentication_error", "", "Invalid API Key provided.")
		return
	}
	if err := r.ParseForm(); err != nil {
		writeErr(w, http.StatusBadRequest, "invalid_request_error", "", "malformed form body")
		return
	}
	kind := f.kindHook(r)
	key := r.Header.Get("Idempotency-Key")
	fp := r.Method + " " + r.URL.Path + "?" + canonical(r.PostForm)

	f.mu.Lock()
	if s, ok := f.idem[key]; ok && key != "" {
		f.calls = append(f.calls, Call{Kind: kind, IdempotencyKey: key, Replayed: true})
		f.mu.Unlock()
		if s.request != fp {
			writeErr(w, http.StatusBadRequest, "idempotency_error", "",
				"Keys for idempotent requests can only be used with the same parameters they were first used with.")
			return
		}
		w.Header().Set("Idempotent-Replayed", "true")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(s.status)
		_, _ = w.Write(s.body)
		return
	}
	f.calls = append(f.calls, Call{Kind: kind, IdempotencyKey: key})
	status, body := f.handle(kind, r)
	if key != "" && r.Method == http.MethodPost && status < 500 {
		f.idem[key] = stored{request: fp, status: status, body: body}
	}
	hook := f.hook
	f.mu.Unlock()
	if hook != nil {
		hook(kind, "after")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (f *Fake) kindHook(r *http.Request) string {
	kind := kindOf(r)
	f.mu.Lock()
	hook := f.hook
	f.mu.Unlock()
	if hook != nil {
		hook(kind, "before")
	}
	return kind
}

// handle changes state; f.mu is held.
func (f *Fake) handle(kind string, r *http.Request) (int, []byte) {
	form := r.PostForm
	meta := metadata(form)
	q := r.URL.Query()
	switch kind {
	case "search_customers":
		// Only the query the invoicer sends: metadata['KEY']:'VALUE'.
		m := searchRe.FindStringSubmatch(q.Get("query"))
		if m == nil {
			return apiErr(http.StatusBadRequest, "parameter_invalid", "the fake only supports metadata['key']:'value' queries")
		}
		var hits []any
		for _, c := range f.customers {
			if c.Metadata[m[1]] == unquote(m[2]) && !c.Deleted {
				hits = append(hits, c)
			}
		}
		return ok(map[string]any{"object": "search_result", "data": orNone(hits), "has_more": false, "url": "/v1/customers/search"})
	case "list_invoices":
		var hits []any
		for i := len(f.order) - 1; i >= 0; i-- { // newest first, as Stripe lists
			inv := f.invoices[f.order[i]]
			if (q.Get("customer") == "" || inv.Customer == q.Get("customer")) && (q.Get("status") == "" || inv.Status == q.Get("status")) {
				hits = append(hits, inv)
			}
		}
		return ok(map[string]any{"object": "list", "data": orNone(hits), "has_more": false, "url": "/v1/invoices"})
	case "credit_note":
		inv := f.invoices[form.Get("invoice")]
		if inv == nil {
			return apiErr(http.StatusBadRequest, "resource_missing", "No such invoice: '"+form.Get("invoice")+"'")
		}
		amt, err := strconv.ParseInt(form.Get("amount"), 10, 64)
		if err != nil || amt <= 0 {
			return apiErr(http.StatusBadRequest, "parameter_invalid", "amount must be a positive integer")
		}
		var credited int64
		for _, c := range f.credits {
			if c.Invoice == inv.ID {
				credited += c.Amount
			}
		}
		if credited+amt > inv.total() {
			return apiErr(http.StatusBadRequest, "parameter_invalid", "The credit note amount exceeds the invoice's remaining total")
		}
		cn := CreditNote{ID: f.id("cn"), Object: "credit_note", Invoice: inv.ID, Amount: amt, Memo: form.Get("memo"), Metadata: meta}
		var toBalance int64
		if v := form.Get("credit_amount"); v != "" {
			if toBalance, err = strconv.ParseInt(v, 10, 64); err != nil || toBalance < 0 || toBalance > amt {
				return apiErr(http.StatusBadRequest, "parameter_invalid", "credit_amount must be between 0 and amount")
			}
		}
		switch inv.Status {
		case "open":
			// As Stripe: what is still due drops by the credit; more than
			// that must be sent somewhere (here, the customer's balance).
			if amt-toBalance > inv.AmountRemaining {
				return apiErr(http.StatusBadRequest, "parameter_invalid", "The credit note exceeds the amount remaining on the invoice; say where the rest goes")
			}
			cn.Type, cn.CreditAmount = "pre_payment", toBalance
			inv.AmountDue -= amt - toBalance
			inv.AmountRemaining = inv.AmountDue
		case "paid":
			if form.Get("credit_amount") != form.Get("amount") {
				return apiErr(http.StatusBadRequest, "parameter_invalid", "a paid invoice's credit note must say where the amount goes (the fake takes credit_amount)")
			}
			cn.Type, cn.CreditAmount = "post_payment", amt
		default:
			return apiErr(http.StatusBadRequest, "invoice_not_finalized", "Invoice "+inv.ID+" is "+inv.Status+"; credit notes need an open or paid invoice")
		}
		f.credits = append(f.credits, cn)
		return ok(cn)
	case "list_credit_notes":
		var hits []any
		for i := len(f.credits) - 1; i >= 0; i-- {
			if c := f.credits[i]; q.Get("invoice") == "" || c.Invoice == q.Get("invoice") {
				hits = append(hits, c)
			}
		}
		return ok(map[string]any{"object": "list", "data": orNone(hits), "has_more": false, "url": "/v1/credit_notes"})
	case "list_items":
		inv := f.invoices[q.Get("invoice")]
		if inv == nil {
			return apiErr(http.StatusNotFound, "resource_missing", "No such invoice: '"+q.Get("invoice")+"'")
		}
		var hits []any
		for i := len(inv.Items) - 1; i >= 0; i-- {
			hits = append(hits, inv.Items[i])
		}
		return ok(map[string]any{"object": "list", "data": orNone(hits), "has_more": false, "url": "/v1/invoiceitems"})
	case "customer":
		c := &Customer{ID: f.id("cus"), Object: "customer", Name: form.Get("name"), Email: form.Get("email"), Metadata: meta}
		f.customers[c.ID] = c
		return ok(c)
	case "get_customer":
		c := f.customers[strings.TrimPrefix(r.URL.Path, "/v1/customers/")]
		switch {
		case c == nil:
			return apiErrOn(http.StatusNotFound, "resource_missing", "id", "No such customer: '"+strings.TrimPrefix(r.URL.Path, "/v1/customers/")+"'")
		case c.Deleted:
			return ok(map[string]any{"id": c.ID, "object": "customer", "deleted": true})
		}
		return ok(c)
	case "invoice":
		if c := f.customers[form.Get("customer")]; c == nil || c.Deleted {
			return apiErrOn(http.StatusBadRequest, "resource_missing", "customer", "No such customer: '"+form.Get("customer")+"'")
		}
		if form.Get("pending_invoice_items_behavior") != "exclude" {
			return apiErr(http.StatusBadRequest, "parameter_invalid", "the fake only supports pending_invoice_items_behavior=exclude")
		}
		inv := &Invoice{ID: f.id("in"), Object: "invoice", Customer: form.Get("customer"), Currency: form.Get("currency"), Description: form.Get("description"),
			Status: "draft", Metadata: meta}
		f.invoices[inv.ID] = inv
		f.order = append(f.order, inv.ID)
		return ok(inv)
	case "item":
		inv := f.invoices[form.Get("invoice")]
		switch {
		case inv == nil:
			return apiErr(http.StatusBadRequest, "resource_missing", "No such invoice: '"+form.Get("invoice")+"'")
		case inv.Status != "draft":
			return apiErr(http.StatusBadRequest, "invoice_not_editable", "Invoice "+inv.ID+" is not a draft")
		case inv.Customer != form.Get("customer"):
			return apiErr(http.StatusBadRequest, "parameter_invalid", "customer does not match the invoice")
		case form.Get("currency") != inv.Currency:
			return apiErr(http.StatusBadRequest, "parameter_invalid", "currency does not match the invoice")
		}
		amt, err := strconv.ParseInt(form.Get("amount"), 10, 64)
		if err != nil {
			return apiErr(http.StatusBadRequest, "parameter_invalid", "amount must be an integer")
		}
		it := Item{ID: f.id("ii"), Object: "invoiceitem", Customer: inv.Customer, Invoice: inv.ID, Amount: amt,
			Currency: inv.Currency, Description: form.Get("description"), Metadata: meta}
		inv.Items = append(inv.Items, it)
		inv.AmountDue += amt
		inv.AmountRemaining = inv.AmountDue
		return ok(it)
	case "finalize":
		id := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/v1/invoices/"), "/finalize")
		inv := f.invoices[id]
		if inv == nil {
			return apiErr(http.StatusNotFound, "resource_missing", "No such invoice: '"+id+"'")
		}
		if inv.Status != "draft" {
			return apiErr(http.StatusBadRequest, "invoice_not_editable", "This invoice is already finalized.")
		}
		inv.Status, inv.HostedInvoiceURL = "open", "https://invoice.stripe.test/i/"+inv.ID
		return ok(inv)
	case "get_invoice":
		inv := f.invoices[strings.TrimPrefix(r.URL.Path, "/v1/invoices/")]
		if inv == nil {
			return apiErr(http.StatusNotFound, "resource_missing", "No such invoice")
		}
		return ok(inv)
	}
	return apiErr(http.StatusNotFound, "unknown_endpoint", "Unrecognized request URL ("+r.Method+" "+r.URL.Path+").")
}

var searchRe = regexp.MustCompile(`^metadata\['([^']+)'\]:'((?:[^'\\]|\\.)*)'$`)

func unquote(v string) string {
	return strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(v)
}

func orNone(v []any) []any {
	if v == nil {
		return []any{}
	}
	return v
}

func metadata(form url.Values) map[string]string {
	m := map[string]string{}
	for k, v := range form {
		if strings.HasPrefix(k, "metadata[") && strings.HasSuffix(k, "]") && len(v) > 0 {
			m[k[len("metadata["):len(k)-1]] = v[0]
		}
	}
	return m
}

func canonical(v url.Values) string {
	keys := make([]string, 0, len(v))
	for k := range v {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + "=" + strings.Join(v[k], ",") + "&")
	}
	return b.String()
}

func ok(v any) (int, []byte) {
	b, _ := json.Marshal(v)
	return http.StatusOK, b
}

func apiErr(status int, code, msg string) (int, []byte) {
	b, _ := json.Marshal(map[string]any{"error": map[string]string{"type": "invalid_request_error", "code": code, "message": msg}})
	return status, b
}

// apiErrOn is apiErr naming the parameter at fault, as Stripe does.
func apiErrOn(status int, code, param, msg string) (int, []byte) {
	b, _ := json.Marshal(map[string]any{"error": map[string]string{"type": "invalid_request_error", "code": code, "param": param, "message": msg}})
	return status, b
}

func writeErr(w http.ResponseWriter, status int, typ, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"type": typ, "code": code, "message": msg}})
}
