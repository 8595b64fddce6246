package invoicer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"

	"github.com/shopspring/decimal"
)

// Model is how a price turns a quantity into an amount.
type Model string

// The pricing models. A hybrid plan (base fee plus overage) is a plan with a
// flat price and a metered price with an included allowance.
const (
	// Flat is a fixed amount per period, whatever the usage.
	Flat Model = "flat"
	// PerUnit charges unit_amount for every billable unit.
	PerUnit Model = "per_unit"
	// Package charges package_amount for every started package of
	// package_size units (rounded up).
	Package Model = "package"
	// Graduated charges each unit at the price of the tier it falls in,
	// plus the flat amount of every tier reached.
	Graduated Model = "graduated"
	// Volume charges every unit at the price of the tier the total falls
	// in, plus that tier's flat amount.
	Volume Model = "volume"
)

// Tier is one band of a graduated or volume price. Amounts are in the
// currency's minor units; unit amounts may have sub-minor precision
// ("0.04" cents is $0.0004).
type Tier struct {
	// UpTo is the last unit of the tier, inclusive; nil means no limit and
	// is allowed only on the last tier.
	UpTo       *int64          `json:"up_to"`
	UnitAmount decimal.Decimal `json:"unit_amount"`
	FlatAmount int64           `json:"flat_amount,omitempty"`
}

// Price is one line of a plan.
type Price struct {
	// Key names the line on the invoice and in the ledger, e.g. "base".
	Key         string `json:"key"`
	Description string `json:"description,omitempty"`
	Model       Model  `json:"model"`
	// Meter is the meter key whose quantity is priced (not for Flat).
	Meter string `json:"meter,omitempty"`
	// Amount is the Flat amount in minor units.
	Amount int64 `json:"amount,omitempty"`
	// UnitAmount is the PerUnit price in minor units (exact decimal).
	UnitAmount    decimal.Decimal `json:"unit_amount,omitzero"`
	PackageSize   int64           `json:"package_size,omitempty"`
	PackageAmount int64           `json:"package_amount,omitempty"`
	Tiers         []Tier          `json:"tiers,omitempty"`
	// Included units are free: only the quantity above them is priced.
	Included int64 `json:"included,omitempty"`
}

// Limits is what the edge enforces for a plan (read by the edge from
// definition->'limits').
type Limits struct {
	RequestsPerSecond int `json:"requests_per_second"`
	Burst             int `json:"burst"`
	// MonthlyRequests is the monthly quota; nil means unlimited.
	MonthlyRequests *int64 `json:"monthly_requests"`
}

// Definition is the JSON object stored in plans.definition. The invoicer
// owns the pricing keys; the edge reads limits and upgrade_url.
type Definition struct {
	Limits     Limits  `json:"limits"`
	UpgradeURL string  `json:"upgrade_url,omitempty"`
	Custom     bool    `json:"custom,omitempty"`
	Prices     []Price `json:"prices"`
}

// Plan is one version of a plan. Versions are never edited: a price change
// is a new version.
type Plan struct {
	ID         string
	Version    int
	Name       string
	Currency   string
	Definition Definition
}

// ChargesNothing reports whether every price of the plan is zero whatever
// the usage, as the free plan's are.
func (p Plan) ChargesNothing() bool {
	for _, pr := range p.Definition.Prices {
		if !pr.chargesNothing() {
			return false
		}
	}
	return true
}

// chargesNothing reports whether the price is zero whatever the quantity.
func (p *Price) chargesNothing() bool {
	switch p.Model {
	case Flat:
		return p.Amount == 0
	case PerUnit:
		return p.UnitAmount.IsZero()
	case Package:
		return p.PackageAmount == 0
	case Graduated, Volume:
		for _, t := range p.Tiers {
			if !t.UnitAmount.IsZero() || t.FlatAmount != 0 {
				return false
			}
		}
		return true
	}
	return false
}

// strictJSON decodes b into v refusing keys v does not have. A plan is
// written by hand, and a misspelled key (include for included, price for
// prices) decoded leniently is a price silently left out: the customer
// billed for an allowance, or a paid plan that charges nothing.
func strictJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("more than one JSON value")
	}
	return nil
}

// UnmarshalJSON reads limits leniently, even inside a strict decode
// (ParseDefinition): they are the edge's to read, and keys the invoicer
// does not know there are none of its business.
func (l *Limits) UnmarshalJSON(b []byte) error {
	type plain Limits // without this method
	var v plain
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*l = Limits(v)
	return nil
}

// ParseDefinition decodes and validates a plan definition.
func ParseDefinition(b []byte) (Definition, error) {
	var d Definition
	if err := strictJSON(b, &d); err != nil {
		return d, fmt.Errorf("%w: plan definition: %v", ErrInvalid, err)
	}
	return d, d.Validate()
}

// ParseBilledDefinition reads a plan version as invoices were billed under
// it before definitions were read strictly: keys it does not know are
// ignored, as are fields of another model. Replay reads plans with it, so
// an invoice billed under a definition ParseDefinition now refuses can
// still be proved; a close never does.
func ParseBilledDefinition(b []byte) (Definition, error) {
	var d Definition
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("%w: plan definition: %v", ErrInvalid, err)
	}
	return d, d.validate(false)
}

// Validate reports every problem with the definition.
func (d *Definition) Validate() error { return d.validate(true) }

// validate reports every problem with the definition; fields, when set,
// includes fields of another model.
func (d *Definition) validate(fields bool) error {
	var errs []error
	seen := map[string]bool{}
	for i, p := range d.Prices {
		if p.Key == "" {
			errs = append(errs, fmt.Errorf("prices[%d]: key required", i))
		} else if seen[p.Key] {
			errs = append(errs, fmt.Errorf("prices[%d]: key %q twice", i, p.Key))
		}
		seen[p.Key] = true
		if err := p.validate(fields); err != nil {
			errs = append(errs, fmt.Errorf("prices[%d] (%s): %w", i, p.Key, err))
		}
	}
	if d.Limits.RequestsPerSecond < 0 || d.Limits.Burst < 0 {
		errs = append(errs, errors.New("limits: negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

// Validate reports every problem with one price.
func (p *Price) Validate() error { return p.validate(true) }

func (p *Price) validate(fields bool) error {
	var errs []error
	bad := func(f string, a ...any) { errs = append(errs, fmt.Errorf(f, a...)) }
	if p.Model != Flat && p.Meter == "" {
		bad("meter required for model %q", p.Model)
	}
	if p.Included < 0 {
		bad("included: negative")
	}
	// A field another model uses is a mistake that bills something other
	// than what was written: a flat fee given as unit_amount bills 0, as
	// do tiers on a per_unit price.
	foreign := func(field string, set bool) {
		if set && fields {
			bad("%s: not used by model %q", field, p.Model)
		}
	}
	if p.Model == Flat {
		foreign("meter", p.Meter != "")
		foreign("included", p.Included != 0)
	}
	if p.Model != "" {
		foreign("amount", p.Model != Flat && p.Amount != 0)
		foreign("unit_amount", p.Model != PerUnit && !p.UnitAmount.IsZero())
		foreign("package_size", p.Model != Package && p.PackageSize != 0)
		foreign("package_amount", p.Model != Package && p.PackageAmount != 0)
		foreign("tiers", p.Model != Graduated && p.Model != Volume && len(p.Tiers) > 0)
	}
	switch p.Model {
	case Flat:
		if p.Amount < 0 {
			bad("amount: negative")
		}
	case PerUnit:
		if p.UnitAmount.IsNegative() {
			bad("unit_amount: negative")
		}
	case Package:
		if p.PackageSize <= 0 {
			bad("package_size: must be positive")
		}
		if p.PackageAmount < 0 {
			bad("package_amount: negative")
		}
	case Graduated, Volume:
		if len(p.Tiers) == 0 {
			bad("tiers: at least one required")
		}
		var prev int64
		for i, t := range p.Tiers {
			last := i == len(p.Tiers)-1
			if t.UpTo == nil && !last {
				bad("tiers[%d]: only the last tier may be unbounded", i)
			}
			if t.UpTo != nil && last {
				bad("tiers[%d]: the last tier must be unbounded (up_to null)", i)
			}
			if t.UpTo != nil && *t.UpTo <= prev {
				bad("tiers[%d]: up_to must increase (and be positive)", i)
			}
			if t.UpTo != nil {
				prev = *t.UpTo
			}
			if t.UnitAmount.IsNegative() || t.FlatAmount < 0 {
				bad("tiers[%d]: negative amount", i)
			}
		}
	default:
		bad("model %q is not one of flat, per_unit, package, graduated, volume", p.Model)
	}
	return errors.Join(errs...)
}

// TierUse is the part of a quantity that fell in one tier.
type TierUse struct {
	Tier int `json:"tier"`
	// First and Last are the billable units covered, 1-based, inclusive.
	First      int64           `json:"first"`
	Last       int64           `json:"last"`
	Quantity   int64           `json:"quantity"`
	UnitAmount decimal.Decimal `json:"unit_amount"`
	FlatAmount int64           `json:"flat_amount"`
	// Amount is exact (minor units, not yet rounded).
	Amount decimal.Decimal `json:"amount"`
}

// Priced is a price applied to a quantity, before proration and rounding.
type Priced struct {
	Quantity int64 `json:"quantity"`
	// Billable is the quantity above the included allowance.
	Billable int64 `json:"billable"`
	// UnitAmount is the unit price applied, when one price applies to
	// every billable unit (per_unit, volume).
	UnitAmount *decimal.Decimal `json:"unit_amount,omitempty"`
	Tiers      []TierUse        `json:"tiers,omitempty"`
	// Exact is the amount in minor units, exact.
	Exact decimal.Decimal `json:"exact"`
}

// Apply prices quantity. It never overflows: decimals are arbitrary
// precision, and rounding to int64 (RoundMinor) reports ErrOverflow.
//
// A negative quantity (a SUM or LATEST meter whose values, corrections
// included, come to less than zero over the period) has nothing billable
// and prices as zero usage, the quantity kept on the line: a price never
// pays usage back (that is a credit note), and refusing it failed the
// whole invoice, flat fees included, on every run for good.
func (p *Price) Apply(quantity int64) (Priced, error) {
	r := Priced{Quantity: quantity}
	if quantity > p.Included { // compared, not subtracted: a quantity near the int64 minimum would wrap
		r.Billable = quantity - p.Included
	}
	q := decimal.NewFromInt(r.Billable)
	switch p.Model {
	case Flat:
		r.Quantity, r.Billable = 1, 1
		r.Exact = decimal.NewFromInt(p.Amount)
	case PerUnit:
		u := p.UnitAmount
		r.UnitAmount = &u
		r.Exact = q.Mul(u)
	case Package:
		// Ceiling division without overflow: big integers throughout.
		n := new(big.Int).Add(big.NewInt(r.Billable), big.NewInt(p.PackageSize-1))
		n.Quo(n, big.NewInt(p.PackageSize))
		r.Exact = decimal.NewFromBigInt(n, 0).Mul(decimal.NewFromInt(p.PackageAmount))
	case Graduated:
		var prev int64
		for i, t := range p.Tiers {
			if r.Billable <= prev {
				break
			}
			last := r.Billable
			if t.UpTo != nil && *t.UpTo < last {
				last = *t.UpTo
			}
			n := last - prev
			amt := decimal.NewFromInt(n).Mul(t.UnitAmount).Add(decimal.NewFromInt(t.FlatAmount))
			r.Tiers = append(r.Tiers, TierUse{Tier: i + 1, First: prev + 1, Last: last, Quantity: n,
				UnitAmount: t.UnitAmount, FlatAmount: t.FlatAmount, Amount: amt})
			r.Exact = r.Exact.Add(amt)
			prev = last
		}
	case Volume:
		if r.Billable == 0 {
			break
		}
		for i, t := range p.Tiers {
			if t.UpTo == nil || r.Billable <= *t.UpTo {
				u := t.UnitAmount
				r.UnitAmount = &u
				amt := q.Mul(u).Add(decimal.NewFromInt(t.FlatAmount))
				r.Tiers = []TierUse{{Tier: i + 1, First: 1, Last: r.Billable, Quantity: r.Billable,
					UnitAmount: u, FlatAmount: t.FlatAmount, Amount: amt}}
				r.Exact = amt
				break
			}
		}
	default:
		return Priced{}, fmt.Errorf("%w: unknown model %q", ErrInvalid, p.Model)
	}
	return r, nil
}

// roundRatHalfEven rounds a non-negative or negative rational to the
// nearest integer, ties to even.
func roundRatHalfEven(x *big.Rat) *big.Int {
	num, den := x.Num(), x.Denom()
	q, r := new(big.Int).QuoRem(num, den, new(big.Int))
	// Compare 2|r| with den.
	twice := new(big.Int).Abs(r)
	twice.Lsh(twice, 1)
	switch c := twice.Cmp(den); {
	case c > 0, c == 0 && q.Bit(0) == 1:
		if num.Sign() < 0 {
			q.Sub(q, big.NewInt(1))
		} else {
			q.Add(q, big.NewInt(1))
		}
	}
	return q
}

// prorate returns exact*num/den rounded half-even to a whole multiple of
// step minor units (LineStep).
// It is used for flat fees of a plan in force for part of a period.
func prorate(exact decimal.Decimal, num, den, step int64) (int64, error) {
	x := exact.Rat()
	x.Mul(x, big.NewRat(num, den*step))
	n := roundRatHalfEven(x)
	n.Mul(n, big.NewInt(step))
	if !n.IsInt64() {
		return 0, fmt.Errorf("%w: %s", ErrOverflow, x.FloatString(4))
	}
	return n.Int64(), nil
}
