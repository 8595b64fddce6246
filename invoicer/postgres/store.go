// Package postgres is the invoicer's system of record in Postgres: plans,
// subscriptions, invoices and lines, the append-only ledger, Stripe sync
// state and webhook events.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Store implements invoicer.Store.
type Store struct {
	pool *pgxpool.Pool
}

var _ invoicer.Store = (*Store)(nil)

// New returns a Store over pool (migrated with schemas.MigratePostgres).
func New(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

// Ledger entry kinds.
const (
	KindDraft      = "invoice.draft"
	KindFinalized  = "invoice.finalized"
	KindSynced     = "invoice.synced"
	KindCreditNote = "credit_note"
)

func scanPlan(row pgx.Row, more ...any) (invoicer.Plan, error) {
	var p invoicer.Plan
	var def []byte
	if err := row.Scan(append([]any{&p.ID, &p.Version, &p.Name, &p.Currency, &def}, more...)...); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return p, invoicer.ErrNotFound
		}
		return p, err
	}
	d, err := invoicer.ParseDefinition(def)
	if err != nil {
		return p, fmt.Errorf("plan %s v%d: %w", p.ID, p.Version, err)
	}
	p.Definition = d
	return p, nil
}

// Plan loads one plan version.
// BilledPlan loads a plan version read as invoices were billed under it
// (invoicer.ParseBilledDefinition), for replay.
func (s *Store) BilledPlan(ctx context.Context, id string, version int) (invoicer.Plan, error) {
	var p invoicer.Plan
	var def []byte
	err := s.pool.QueryRow(ctx, `SELECT id, version, name, currency, definition FROM plans WHERE id = $1 AND version = $2`, id, version).
		Scan(&p.ID, &p.Version, &p.Name, &p.Currency, &def)
	if errors.Is(err, pgx.ErrNoRows) {
		err = invoicer.ErrNotFound
	}
	if err == nil {
		p.Definition, err = invoicer.ParseBilledDefinition(def)
	}
	if err != nil {
		return p, fmt.Errorf("load plan %s v%d: %w", id, version, err)
	}
	return p, nil
}

func (s *Store) Plan(ctx context.Context, id string, version int) (invoicer.Plan, error) {
	p, err := scanPlan(s.pool.QueryRow(ctx, `SELECT id, version, name, currency, definition FROM plans WHERE id = $1 AND version = $2`, id, version))
	if err != nil {
		return p, fmt.Errorf("load plan %s v%d: %w", id, version, err)
	}
	return p, nil
}

// PlanVersions loads every version of a plan, oldest first, with when each
// was published.
func (s *Store) PlanVersions(ctx context.Context, id string) ([]invoicer.PlanVersion, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, version, name, currency, definition, created_at FROM plans WHERE id = $1 ORDER BY version`, id)
	if err != nil {
		return nil, fmt.Errorf("load plan %s: %w", id, err)
	}
	defer rows.Close()
	var out []invoicer.PlanVersion
	for rows.Next() {
		var v invoicer.PlanVersion
		v.Plan, err = scanPlan(rows, &v.Since)
		if err != nil && !errors.Is(err, invoicer.ErrInvalid) {
			return nil, fmt.Errorf("load plan %s: %w", id, err)
		}
		// A version refused as written fails only the time it prices.
		v.Err = err
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load plan %s: %w", id, err)
	}
	return out, nil
}

const accountCols = `id, name, coalesce(email, ''), timezone, currency, created_at`

func scanAccount(row pgx.Row) (invoicer.Account, error) {
	var a invoicer.Account
	err := row.Scan(&a.ID, &a.Name, &a.Email, &a.Timezone, &a.Currency, &a.CreatedAt)
	return a, err
}

// Accounts lists every account.
func (s *Store) Accounts(ctx context.Context) ([]invoicer.Account, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+accountCols+` FROM accounts ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (invoicer.Account, error) { return scanAccount(r) })
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	return out, nil
}

// Account loads one account.
func (s *Store) Account(ctx context.Context, id string) (invoicer.Account, error) {
	a, err := scanAccount(s.pool.QueryRow(ctx, `SELECT `+accountCols+` FROM accounts WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return a, fmt.Errorf("account %s: %w", id, invoicer.ErrNotFound)
	}
	if err != nil {
		return a, fmt.Errorf("load account %s: %w", id, err)
	}
	return a, nil
}

// Subscriptions returns, per account, the subscriptions overlapping p, in
// one query.
func (s *Store) Subscriptions(ctx context.Context, accountIDs []string, p invoicer.Period) (map[string][]invoicer.Subscription, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT account_id, plan_id, plan_version, starts_at, ends_at FROM subscriptions
		WHERE account_id = ANY($1) AND starts_at < $3 AND (ends_at IS NULL OR ends_at > $2)
		ORDER BY account_id, starts_at, created_at`, accountIDs, p.Start, p.End)
	if err != nil {
		return nil, fmt.Errorf("list subscriptions: %w", err)
	}
	defer rows.Close()
	out := map[string][]invoicer.Subscription{}
	for rows.Next() {
		var sub invoicer.Subscription
		if err := rows.Scan(&sub.AccountID, &sub.PlanID, &sub.PlanVersion, &sub.StartsAt, &sub.EndsAt); err != nil {
			return nil, fmt.Errorf("list subscriptions: %w", err)
		}
		out[sub.AccountID] = append(out[sub.AccountID], sub)
	}
	return out, rows.Err()
}

// InvoicedPeriods returns, per account, the periods of its invoices that
// start at or after since.
func (s *Store) InvoicedPeriods(ctx context.Context, since time.Time) (map[string][]invoicer.Period, error) {
	rows, err := s.pool.Query(ctx, `SELECT account_id, period_start, period_end FROM invoices WHERE period_start >= $1`, since)
	if err != nil {
		return nil, fmt.Errorf("list invoiced periods: %w", err)
	}
	defer rows.Close()
	out := map[string][]invoicer.Period{}
	for rows.Next() {
		var a string
		var p invoicer.Period
		if err := rows.Scan(&a, &p.Start, &p.End); err != nil {
			return nil, err
		}
		out[a] = append(out[a], invoicer.Period{Start: p.Start.UTC(), End: p.End.UTC()})
	}
	return out, rows.Err()
}

// SaveDrafts stores the invoices, their lines and one invoice.draft ledger
// entry each, in one transaction. Rows are copied (COPY) into temporary
// tables and inserted from there with ON CONFLICT DO NOTHING, so a retried
// close adds nothing and a thousand invoices cost a handful of round trips.
func (s *Store) SaveDrafts(ctx context.Context, invs []invoicer.Invoice) error {
	if len(invs) == 0 {
		return nil
	}
	invRows := make([][]any, 0, len(invs))
	var lineRows [][]any
	for _, inv := range invs {
		doc, err := json.Marshal(inv)
		if err != nil {
			return fmt.Errorf("encode invoice %s: %w", inv.ID, err)
		}
		invRows = append(invRows, []any{inv.ID, inv.AccountID, inv.Period.Start, inv.Period.End, inv.Currency,
			inv.Total, inv.Fingerprint.Hash, doc})
		for _, l := range inv.Lines {
			tiers := []byte("[]")
			if l.Tiers != nil {
				tiers, _ = json.Marshal(l.Tiers)
			}
			var unit, m *string
			if l.UnitAmount != nil {
				u := l.UnitAmount.String()
				unit = &u
			}
			if l.Meter != "" {
				m = &l.Meter
			}
			lineRows = append(lineRows, []any{inv.ID, int32(l.No), l.PriceKey, l.Description, string(l.Model), m,
				l.PlanID, int32(l.PlanVersion), l.Quantity, l.Billable, unit, l.Exact.String(), l.Amount, tiers})
		}
	}
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `
			CREATE TEMP TABLE draft_invoices (id text, account_id text, period_start timestamptz, period_end timestamptz,
			  currency text, total_minor bigint, fingerprint_hash text, document jsonb) ON COMMIT DROP;
			CREATE TEMP TABLE draft_lines (invoice_id text, line_no integer, price_key text, description text, model text,
			  meter text, plan_id text, plan_version integer, quantity bigint, billable bigint, unit_amount text,
			  amount_exact text, amount_minor bigint, tiers jsonb) ON COMMIT DROP`); err != nil {
			return fmt.Errorf("save draft invoices: %w", err)
		}
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"draft_invoices"}, []string{"id", "account_id", "period_start",
			"period_end", "currency", "total_minor", "fingerprint_hash", "document"}, pgx.CopyFromRows(invRows)); err != nil {
			return fmt.Errorf("copy draft invoices: %w", err)
		}
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"draft_lines"}, []string{"invoice_id", "line_no", "price_key",
			"description", "model", "meter", "plan_id", "plan_version", "quantity", "billable", "unit_amount",
			"amount_exact", "amount_minor", "tiers"}, pgx.CopyFromRows(lineRows)); err != nil {
			return fmt.Errorf("copy draft lines: %w", err)
		}
		// An invoice that exists already (another close made it) keeps
		// its own lines: only the invoices inserted here get theirs, in
		// the same statement, so another computation's extra lines never
		// join an invoice whose total they are not part of.
		if _, err := tx.Exec(ctx, `
			WITH ins AS (
			  INSERT INTO invoices (id, account_id, period_start, period_end, currency, total_minor, fingerprint_hash, document)
			  SELECT id, account_id, period_start, period_end, currency, total_minor, fingerprint_hash, document FROM draft_invoices
			  ON CONFLICT DO NOTHING
			  RETURNING id, account_id, currency, total_minor, document->'fingerprint' AS fingerprint),
			led AS (
			  INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
			  SELECT account_id, $1, id, total_minor, currency, fingerprint FROM ins ORDER BY id)
			INSERT INTO invoice_lines (invoice_id, line_no, price_key, description, model, meter, plan_id, plan_version,
			  quantity, billable, unit_amount, amount_exact, amount_minor, tiers)
			SELECT invoice_id, line_no, price_key, description, model, meter, plan_id, plan_version, quantity, billable,
			  unit_amount::numeric, amount_exact::numeric, amount_minor, tiers FROM draft_lines
			WHERE invoice_id IN (SELECT id FROM ins)`, KindDraft); err != nil {
			return fmt.Errorf("save draft invoices: %w", err)
		}
		return nil
	})
}

// Finalize appends invoice.finalized to each draft, at most once.
func (s *Store) Finalize(ctx context.Context, ids []string) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
		SELECT account_id, $2, id, total_minor, currency, jsonb_build_object('fingerprint_hash', fingerprint_hash)
		FROM invoices WHERE id = ANY($1)
		ON CONFLICT (invoice_id, kind) WHERE kind IN ('invoice.draft', 'invoice.finalized', 'invoice.synced') DO NOTHING`,
		ids, KindFinalized)
	if err != nil {
		return fmt.Errorf("finalize invoices: %w", err)
	}
	return nil
}

// FinalizeDrafts finalizes every invoice left a draft, by a close that
// stopped between saving its drafts and finalizing them: InvoicedPeriods
// counts a draft's period as invoiced, so no later close would.
func (s *Store) FinalizeDrafts(ctx context.Context) (int, error) {
	tag, err := s.pool.Exec(ctx, `
		INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
		SELECT account_id, $1, id, total_minor, currency, jsonb_build_object('fingerprint_hash', fingerprint_hash)
		FROM invoices i
		WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.invoice_id = i.id AND e.kind = $1)
		ON CONFLICT (invoice_id, kind) WHERE kind IN ('invoice.draft', 'invoice.finalized', 'invoice.synced') DO NOTHING`,
		KindFinalized)
	if err != nil {
		return 0, fmt.Errorf("finalize left drafts: %w", err)
	}
	return int(tag.RowsAffected()), nil
}

// invoiceSelect reads invoices with the status and Stripe link their
// ledger entries and sync steps give. The status is the furthest along of
// its entries (the newest among equals), not simply the newest: Stripe does
// not deliver webhooks in order, so a retried payment_failed may arrive
// after paid, and a sync resumed after a crash may record the invoice as
// sent after Stripe reported it paid. paid and void are final: the first
// of them stands (a voided event after paid once made a paid invoice void).
// Only the
// entries of events about the Stripe invoice the sync recorded count: one
// written before the sync recorded which it is may be a copy's.
const invoiceSelect = `
	SELECT i.document, i.created_at,
	  coalesce((SELECT kind FROM ledger_entries e WHERE e.invoice_id = i.id
	     AND kind IN ('invoice.draft', 'invoice.finalized', 'invoice.synced', 'stripe.invoice.paid',
	                  'stripe.invoice.payment_failed', 'stripe.invoice.voided')
	     AND (kind NOT LIKE 'stripe.%' OR e.payload->>'stripe_object_id' =
	          (SELECT stripe_id FROM stripe_sync_steps s WHERE s.invoice_id = i.id AND s.step = 'invoice'))
	     ORDER BY CASE kind WHEN 'invoice.draft' THEN 0 WHEN 'invoice.finalized' THEN 1 WHEN 'invoice.synced' THEN 2
	                        WHEN 'stripe.invoice.payment_failed' THEN 3 ELSE 4 END DESC,
	              CASE WHEN kind IN ('stripe.invoice.paid', 'stripe.invoice.voided') THEN e.id END ASC,
	              e.id DESC LIMIT 1), ''),
	  coalesce((SELECT stripe_id FROM stripe_sync_steps s WHERE s.invoice_id = i.id AND s.step = 'invoice'), ''),
	  coalesce((SELECT detail->>'hosted_invoice_url' FROM stripe_sync_steps s WHERE s.invoice_id = i.id AND s.step = 'finalize'), '')
	FROM invoices i`

var statusOf = map[string]invoicer.Status{
	KindDraft: invoicer.StatusDraft, KindFinalized: invoicer.StatusFinalized, KindSynced: invoicer.StatusSynced,
	"stripe.invoice.paid": invoicer.StatusPaid, "stripe.invoice.payment_failed": invoicer.StatusPaymentFailed,
	"stripe.invoice.voided": invoicer.StatusVoid,
}

func (s *Store) invoices(ctx context.Context, where string, args ...any) ([]invoicer.StoredInvoice, error) {
	rows, err := s.pool.Query(ctx, invoiceSelect+" "+where, args...)
	if err != nil {
		return nil, fmt.Errorf("list invoices: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (invoicer.StoredInvoice, error) {
		var si invoicer.StoredInvoice
		var doc []byte
		var kind string
		if err := r.Scan(&doc, &si.CreatedAt, &kind, &si.StripeInvoiceID, &si.HostedURL); err != nil {
			return si, err
		}
		if err := json.Unmarshal(doc, &si.Invoice); err != nil {
			return si, fmt.Errorf("decode invoice document: %w", err)
		}
		si.Status = statusOf[kind]
		return si, nil
	})
	if err != nil {
		return nil, fmt.Errorf("list invoices: %w", err)
	}
	return out, nil
}

// Invoice loads one invoice.
func (s *Store) Invoice(ctx context.Context, id string) (invoicer.StoredInvoice, error) {
	out, err := s.invoices(ctx, "WHERE i.id = $1", id)
	if err != nil {
		return invoicer.StoredInvoice{}, err
	}
	if len(out) == 0 {
		return invoicer.StoredInvoice{}, fmt.Errorf("invoice %s: %w", id, invoicer.ErrNotFound)
	}
	return out[0], nil
}

// AccountInvoices lists an account's invoices, newest period first.
func (s *Store) AccountInvoices(ctx context.Context, accountID string) ([]invoicer.StoredInvoice, error) {
	return s.invoices(ctx, "WHERE i.account_id = $1 ORDER BY i.period_start DESC", accountID)
}

// AccountInvoicesBefore lists up to limit of an account's invoices whose
// period starts before before (zero: all), newest period first. An account
// has one invoice per period start, so the start orders them fully.
func (s *Store) AccountInvoicesBefore(ctx context.Context, accountID string, before time.Time, limit int) ([]invoicer.StoredInvoice, error) {
	if before.IsZero() {
		return s.invoices(ctx, "WHERE i.account_id = $1 ORDER BY i.period_start DESC LIMIT $2", accountID, limit)
	}
	return s.invoices(ctx, "WHERE i.account_id = $1 AND i.period_start < $2 ORDER BY i.period_start DESC LIMIT $3", accountID, before, limit)
}

// ClosedInvoices lists finalized invoices whose period starts in [from, to).
// Each comes with the ledger's records of it (invoicer.LedgerRecords), for
// replay to check against its document.
func (s *Store) ClosedInvoices(ctx context.Context, from, to time.Time) ([]invoicer.StoredInvoice, error) {
	invs, err := s.invoices(ctx, `WHERE i.period_start >= $1 AND i.period_start < $2
		AND EXISTS (SELECT 1 FROM ledger_entries e WHERE e.invoice_id = i.id AND e.kind = 'invoice.finalized')
		ORDER BY i.period_start, i.account_id`, from, to)
	if err != nil || len(invs) == 0 {
		return invs, err
	}
	ids := make([]string, len(invs))
	for i, si := range invs {
		ids[i] = si.ID
	}
	rows, err := s.pool.Query(ctx, `
		SELECT i.id, i.total_minor, i.fingerprint_hash,
		  (SELECT count(*) FROM invoice_lines l WHERE l.invoice_id = i.id),
		  (SELECT coalesce(sum(l.amount_minor), 0) FROM invoice_lines l WHERE l.invoice_id = i.id)::bigint,
		  d.amount_minor, coalesce(d.payload->>'hash', ''),
		  f.amount_minor, coalesce(f.payload->>'fingerprint_hash', '')
		FROM invoices i
		LEFT JOIN ledger_entries d ON d.invoice_id = i.id AND d.kind = 'invoice.draft'
		LEFT JOIN ledger_entries f ON f.invoice_id = i.id AND f.kind = 'invoice.finalized'
		WHERE i.id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("read the ledger's records of the invoices: %w", err)
	}
	recs := map[string]*invoicer.LedgerRecords{}
	for rows.Next() {
		var id string
		var r invoicer.LedgerRecords
		if err := rows.Scan(&id, &r.Total, &r.Hash, &r.Lines, &r.LinesTotal, &r.DraftAmount, &r.DraftHash,
			&r.FinalizedAmount, &r.FinalizedHash); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read the ledger's records of the invoices: %w", err)
		}
		recs[id] = &r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the ledger's records of the invoices: %w", err)
	}
	for i := range invs {
		invs[i].Records = recs[invs[i].ID]
	}
	return invs, nil
}

// UnsyncedInvoices lists invoices with a positive total and no
// invoice.synced entry that were finalized at or after since, or whose
// sync has begun (a Stripe step is recorded) whenever they were finalized:
// a sync part-way through when the start was first recorded (a ledger
// from before it was, which never finished one) is finished, not left
// as a draft in Stripe.
func (s *Store) UnsyncedInvoices(ctx context.Context, since time.Time) ([]invoicer.StoredInvoice, error) {
	return s.invoices(ctx, `WHERE i.total_minor > 0
		AND EXISTS (SELECT 1 FROM ledger_entries e WHERE e.invoice_id = i.id AND e.kind = 'invoice.finalized'
		  AND (e.created_at >= $1 OR EXISTS (SELECT 1 FROM stripe_sync_steps s WHERE s.invoice_id = i.id)))
		AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.invoice_id = i.id AND e.kind = 'invoice.synced')
		ORDER BY i.period_start, i.account_id`, since)
}

// StripeSyncStart records, the first time, that this ledger syncs to
// Stripe from now on in mode, and returns when that began and the mode
// recorded. A ledger that synced before the record existed (mode "")
// takes mode now.
func (s *Store) StripeSyncStart(ctx context.Context, mode string) (time.Time, string, error) {
	if _, err := s.pool.Exec(ctx, `INSERT INTO stripe_sync_start (mode) VALUES ($1) ON CONFLICT DO NOTHING`, mode); err != nil {
		return time.Time{}, "", fmt.Errorf("record the start of stripe sync: %w", err)
	}
	if _, err := s.pool.Exec(ctx, `UPDATE stripe_sync_start SET mode = $1 WHERE mode = '' AND $1 <> ''`, mode); err != nil {
		return time.Time{}, "", fmt.Errorf("record the stripe sync mode: %w", err)
	}
	var at time.Time
	var recorded string
	if err := s.pool.QueryRow(ctx, `SELECT started_at, mode FROM stripe_sync_start`).Scan(&at, &recorded); err != nil {
		return time.Time{}, "", fmt.Errorf("read the start of stripe sync: %w", err)
	}
	return at, recorded, nil
}

// StripeCustomer returns the account's Stripe customer id, or "".
func (s *Store) StripeCustomer(ctx context.Context, accountID string) (id string, replacement bool, err error) {
	err = s.pool.QueryRow(ctx, `SELECT customer_id FROM stripe_customers WHERE account_id = $1`, accountID).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("load stripe customer: %w", err)
	}
	// Each replacement names the customer it replaces: the account's
	// customer is the chain's end. ReplaceStripeCustomer refuses a
	// customer already in the chain, so it has no loop; the bound only
	// guards against a row written by hand.
	for range 1000 {
		var next string
		err := s.pool.QueryRow(ctx, `SELECT customer_id FROM stripe_customer_replacements WHERE account_id = $1 AND replaced = $2`,
			accountID, id).Scan(&next)
		if errors.Is(err, pgx.ErrNoRows) {
			return id, replacement, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("load stripe customer replacement: %w", err)
		}
		id, replacement = next, true
	}
	return "", false, fmt.Errorf("load stripe customer: more than 1000 replacements of account %s's customer", accountID)
}

// ReplaceStripeCustomer records customerID in place of replaced, unless a
// replacement of replaced was recorded first, and returns the one recorded.
func (s *Store) ReplaceStripeCustomer(ctx context.Context, accountID, replaced, customerID string) (string, error) {
	// A customer already in the account's chain (its first, or one
	// replaced or replacing) would make a loop, which no read could
	// follow to an end: refused, unless it is replaced's recorded
	// replacement already. The insert writes nothing then, either way.
	_, err := s.pool.Exec(ctx, `INSERT INTO stripe_customer_replacements (account_id, replaced, customer_id)
SELECT $1, $2, $3
WHERE NOT EXISTS (SELECT 1 FROM stripe_customers WHERE account_id = $1 AND customer_id = $3)
  AND NOT EXISTS (SELECT 1 FROM stripe_customer_replacements WHERE account_id = $1 AND (customer_id = $3 OR replaced = $3))
ON CONFLICT (account_id, replaced) DO NOTHING`, accountID, replaced, customerID)
	if err != nil {
		return "", fmt.Errorf("save stripe customer replacement: %w", err)
	}
	var stored string
	err = s.pool.QueryRow(ctx, `SELECT customer_id FROM stripe_customer_replacements WHERE account_id = $1 AND replaced = $2`,
		accountID, replaced).Scan(&stored)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("replace stripe customer %s of account %s by %s: %s is the account's customer already, or was: refused, as a loop in the account's customers", replaced, accountID, customerID, customerID)
	}
	if err != nil {
		return "", fmt.Errorf("read stripe customer replacement: %w", err)
	}
	return stored, nil
}

// SaveStripeCustomer records the account's Stripe customer, unless another
// was recorded first, and returns the one recorded. The read after the
// insert sees a row another instance committed first (each statement reads
// what was committed before it began).
func (s *Store) SaveStripeCustomer(ctx context.Context, accountID, customerID string) (string, error) {
	_, err := s.pool.Exec(ctx, `INSERT INTO stripe_customers (account_id, customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`, accountID, customerID)
	if err != nil {
		return "", fmt.Errorf("save stripe customer: %w", err)
	}
	var stored string
	if err := s.pool.QueryRow(ctx, `SELECT customer_id FROM stripe_customers WHERE account_id = $1`, accountID).Scan(&stored); err != nil {
		return "", fmt.Errorf("read stripe customer: %w", err)
	}
	return stored, nil
}

// SyncSteps returns the completed Stripe steps of an invoice.
func (s *Store) SyncSteps(ctx context.Context, invoiceID string) (map[string]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT step, stripe_id FROM stripe_sync_steps WHERE invoice_id = $1`, invoiceID)
	if err != nil {
		return nil, fmt.Errorf("load sync steps: %w", err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var step, id string
		if err := rows.Scan(&step, &id); err != nil {
			return nil, err
		}
		out[step] = id
	}
	return out, rows.Err()
}

// SaveSyncStep records a completed Stripe step.
func (s *Store) SaveSyncStep(ctx context.Context, invoiceID, step, stripeID string, detail map[string]string) error {
	if detail == nil {
		detail = map[string]string{}
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO stripe_sync_steps (invoice_id, step, stripe_id, detail) VALUES ($1, $2, $3, $4)
		ON CONFLICT DO NOTHING`, invoiceID, step, stripeID, detail)
	if err != nil {
		return fmt.Errorf("save sync step %s of %s: %w", step, invoiceID, err)
	}
	return nil
}

// UnsyncedCreditNotes lists the credit notes of invoices Stripe has
// finalized (a finalize step is recorded) with no credit note step yet.
func (s *Store) UnsyncedCreditNotes(ctx context.Context) ([]invoicer.CreditNote, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT e.id, e.invoice_id, inv.stripe_id, e.currency, -e.amount_minor, coalesce(e.payload->>'reason', '')
		FROM ledger_entries e
		JOIN stripe_sync_steps inv ON inv.invoice_id = e.invoice_id AND inv.step = 'invoice'
		JOIN stripe_sync_steps fin ON fin.invoice_id = e.invoice_id AND fin.step = 'finalize'
		WHERE e.kind = $1 AND NOT EXISTS (SELECT 1 FROM stripe_sync_steps c
			WHERE c.invoice_id = e.invoice_id AND c.step = 'credit_note:' || e.id::text)
		  -- Stripe cannot credit a voided invoice: nothing is owed on it. Void
		  -- counts as the status does (invoiceSelect): only when no paid
		  -- came before it, else the invoice stays paid and is credited.
		  AND NOT EXISTS (SELECT 1 FROM ledger_entries v WHERE v.invoice_id = e.invoice_id AND v.kind = 'stripe.invoice.voided'
		    AND v.payload->>'stripe_object_id' = inv.stripe_id
		    AND NOT EXISTS (SELECT 1 FROM ledger_entries p WHERE p.invoice_id = v.invoice_id AND p.kind = 'stripe.invoice.paid'
		      AND p.payload->>'stripe_object_id' = inv.stripe_id AND p.id < v.id))
		ORDER BY e.id`, KindCreditNote)
	if err != nil {
		return nil, fmt.Errorf("list unsynced credit notes: %w", err)
	}
	defer rows.Close()
	var out []invoicer.CreditNote
	for rows.Next() {
		var cn invoicer.CreditNote
		if err := rows.Scan(&cn.ID, &cn.InvoiceID, &cn.StripeInvoiceID, &cn.Currency, &cn.Amount, &cn.Reason); err != nil {
			return nil, fmt.Errorf("list unsynced credit notes: %w", err)
		}
		out = append(out, cn)
	}
	return out, rows.Err()
}

// MarkSynced appends invoice.synced once.
func (s *Store) MarkSynced(ctx context.Context, invoiceID, stripeInvoiceID, hostedURL string) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
		SELECT account_id, $2, id, total_minor, currency, jsonb_build_object('stripe_invoice_id', $3::text,
		  'hosted_invoice_url', coalesce(nullif($4::text, ''),
		    (SELECT detail->>'hosted_invoice_url' FROM stripe_sync_steps WHERE invoice_id = $1 AND step = 'finalize'), ''))
		FROM invoices WHERE id = $1
		ON CONFLICT (invoice_id, kind) WHERE kind IN ('invoice.draft', 'invoice.finalized', 'invoice.synced') DO NOTHING`,
		invoiceID, KindSynced, stripeInvoiceID, hostedURL)
	if err != nil {
		return fmt.Errorf("mark %s synced: %w", invoiceID, err)
	}
	return nil
}

// RecordWebhook stores the event once and appends its ledger entry in the
// same transaction.
func (s *Store) RecordWebhook(ctx context.Context, ev invoicer.WebhookEvent) (bool, error) {
	var fresh bool
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var inv *string
		if ev.InvoiceID != "" {
			inv = &ev.InvoiceID
		}
		tag, err := tx.Exec(ctx, `INSERT INTO stripe_webhook_events (event_id, type, object_id, invoice_id, payload)
			VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`, ev.ID, ev.Type, ev.ObjectID, inv, ev.Payload)
		if err != nil {
			return err
		}
		if fresh = tag.RowsAffected() == 1; !fresh || inv == nil {
			return nil
		}
		// The event names the ledger invoice by metadata, which any Stripe
		// invoice can carry (a copy made in Stripe's dashboard, a stray
		// draft, another ledger's or a test-mode copy of the same invoice,
		// whose id is the same). Its entry is written unless the sync has
		// recorded another Stripe invoice as this one's, and the status and
		// the credit notes count only the entries of the one it recorded
		// (invoiceSelect, UnsyncedCreditNotes): an event of ours that comes
		// before the sync records it (a sync resumed after a crash, the
		// invoice finalized and paid in Stripe meanwhile) counts once it
		// does, and a copy's never.
		_, err = tx.Exec(ctx, `
			INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
			SELECT account_id, $2, id, $3, currency, jsonb_build_object('stripe_event_id', $4::text, 'stripe_object_id', $5::text)
			FROM invoices i WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM stripe_sync_steps s
			  WHERE s.invoice_id = i.id AND s.step = 'invoice' AND s.stripe_id <> $5)`, ev.InvoiceID, "stripe."+ev.Type, ev.Amount, ev.ID, ev.ObjectID)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("record webhook %s: %w", ev.ID, err)
	}
	return fresh, nil
}

// AppendCreditNote appends a credit note (a negative amount) to a
// finalized invoice. Credit notes never add up to more than the invoice's
// total: the invoice row is locked while the credits already given are
// summed, so two at once cannot both pass.
//
// With an idempotency key, a credit note appended before under the same
// key is returned instead of appending another (Replayed), when it was for
// the same invoice, amount and reason; for anything else the key is a
// conflict. The key is looked up with the invoice locked, so a retry racing
// its first run waits for it and finds its credit note.
func (s *Store) AppendCreditNote(ctx context.Context, invoiceID string, amount int64, reason, key string) (invoicer.CreditNoteResult, error) {
	var none invoicer.CreditNoteResult
	if amount <= 0 {
		return none, fmt.Errorf("%w: credit note amount must be positive", invoicer.ErrInvalid)
	}
	if err := invoicer.ValidIdempotencyKey(key); err != nil {
		return none, err
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return none, fmt.Errorf("append credit note: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit
	// The lock first, in a statement of its own: under READ COMMITTED a
	// statement that waited for a lock still reads with the snapshot it
	// started with, so the credits are summed by the next statement, which
	// sees what the holder of the lock committed.
	var total, credited int64
	var finalized bool
	var currency string
	// NO KEY UPDATE: serializes credit notes without holding back the
	// invoice's sync steps, whose foreign keys take a key-share lock.
	err = tx.QueryRow(ctx, `SELECT total_minor, currency FROM invoices WHERE id = $1 FOR NO KEY UPDATE`, invoiceID).Scan(&total, &currency)
	if err == nil {
		err = tx.QueryRow(ctx, `SELECT
				EXISTS (SELECT 1 FROM ledger_entries e WHERE e.invoice_id = $1 AND e.kind = 'invoice.finalized'),
				coalesce((SELECT -sum(e.amount_minor) FROM ledger_entries e WHERE e.invoice_id = $1 AND e.kind = $2), 0)::bigint`,
			invoiceID, KindCreditNote).Scan(&finalized, &credited)
	}
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && !finalized) {
		return none, fmt.Errorf("finalized invoice %s: %w", invoiceID, invoicer.ErrNotFound)
	}
	if err != nil {
		return none, fmt.Errorf("append credit note: %w", err)
	}
	if key != "" {
		// Before the cap: a retry of a credit note that took the last of
		// the invoice is answered with that credit note, not refused.
		var prev struct {
			id           int64
			invoice, why string
			amount       int64
		}
		err := tx.QueryRow(ctx, `SELECT id, invoice_id, -amount_minor, coalesce(payload ->> 'reason', '')
			FROM ledger_entries WHERE kind = $1 AND payload ->> 'idempotency_key' = $2 AND payload ? 'idempotency_key'`,
			KindCreditNote, key).Scan(&prev.id, &prev.invoice, &prev.amount, &prev.why)
		switch {
		case err == nil && prev.invoice == invoiceID && prev.amount == amount && prev.why == reason:
			return invoicer.CreditNoteResult{ID: prev.id, Replayed: true}, nil
		case err == nil:
			return none, fmt.Errorf("%w: idempotency key %q was used for another credit note (%d on invoice %s); use a new key for a new credit note",
				invoicer.ErrConflict, key, prev.amount, prev.invoice)
		case !errors.Is(err, pgx.ErrNoRows):
			return none, fmt.Errorf("append credit note: %w", err)
		}
	}
	if _, err := invoicer.StripeAmount(amount, currency); err != nil {
		// Stripe could never take it (a three-decimal currency's amount
		// not a multiple of 10), and the customer would go on being
		// charged in full there.
		return none, fmt.Errorf("%w: credit note: %v", invoicer.ErrInvalid, err)
	}
	if amount > total-credited {
		return none, fmt.Errorf("%w: a credit note of %d would credit more than invoice %s's total of %d (%d already credited)",
			invoicer.ErrConflict, amount, invoiceID, total, credited)
	}
	payload := map[string]string{"reason": reason}
	if key != "" {
		payload["idempotency_key"] = key
	}
	var id int64
	err = tx.QueryRow(ctx, `
		INSERT INTO ledger_entries (account_id, kind, invoice_id, amount_minor, currency, payload)
		SELECT account_id, $2, id, -$3::bigint, currency, $4::jsonb
		FROM invoices WHERE id = $1 RETURNING id`, invoiceID, KindCreditNote, amount, payload).Scan(&id)
	if pe := (*pgconn.PgError)(nil); errors.As(err, &pe) && pe.Code == "23505" {
		// The same key on another invoice, appended since the lookup
		// (the lock is per invoice).
		return none, fmt.Errorf("%w: idempotency key %q was used for another credit note; use a new key for a new credit note",
			invoicer.ErrConflict, key)
	}
	if err != nil {
		return none, fmt.Errorf("append credit note: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return none, fmt.Errorf("append credit note: %w", err)
	}
	return invoicer.CreditNoteResult{ID: id}, nil
}

var _ invoicer.SpoolHolds = (*Store)(nil)

// SpoolHolds lists the edge instances' spool holds.
func (s *Store) SpoolHolds(ctx context.Context) ([]schemas.SpoolHold, error) {
	rows, err := s.pool.Query(ctx, `SELECT instance, since, released_at FROM edge_spool_holds ORDER BY since`)
	if err != nil {
		return nil, fmt.Errorf("spool holds: %w", err)
	}
	defer rows.Close()
	var out []schemas.SpoolHold
	for rows.Next() {
		var h schemas.SpoolHold
		var released *time.Time
		if err := rows.Scan(&h.Instance, &h.Since, &released); err != nil {
			return nil, fmt.Errorf("spool holds: %w", err)
		}
		if released != nil {
			h.Released = *released
		}
		out = append(out, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("spool holds: %w", err)
	}
	return out, nil
}

// RetireSpoolHold removes a released hold, unless the edge has taken it up
// again or moved its release since it was read.
func (s *Store) RetireSpoolHold(ctx context.Context, h schemas.SpoolHold) error {
	if h.Released.IsZero() {
		return fmt.Errorf("%w: spool hold of %s is not released", invoicer.ErrInvalid, h.Instance)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM edge_spool_holds WHERE instance = $1 AND since = $2 AND released_at = $3`,
		h.Instance, h.Since, h.Released); err != nil {
		return fmt.Errorf("retire spool hold: %w", err)
	}
	return nil
}
