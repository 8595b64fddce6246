package invoicer

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shopspring/decimal"
)

func d(s string) decimal.Decimal { return decimal.RequireFromString(s) }
func up(n int64) *int64          { return &n }

// Prices used by the table: boundaries at 1,000 and 10,000 units.
var (
	perUnit   = Price{Key: "calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d("0.04")}
	pkg       = Price{Key: "calls", Model: Package, Meter: "api_calls", PackageSize: 1000, PackageAmount: 150}
	tiers     = []Tier{{UpTo: up(1000), UnitAmount: d("0")}, {UpTo: up(10000), UnitAmount: d("0.5"), FlatAmount: 100}, {UnitAmount: d("0.25")}}
	graduated = Price{Key: "calls", Model: Graduated, Meter: "api_calls", Tiers: tiers}
	volume    = Price{Key: "calls", Model: Volume, Meter: "api_calls", Tiers: tiers}
	included  = Price{Key: "calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d("2"), Included: 1000}
	flat      = Price{Key: "base", Model: Flat, Amount: 2900}
)

func TestPriceApplyAtEveryBoundary(t *testing.T) {
	cases := []struct {
		name  string
		price Price
		q     int64
		want  int64
	}{
		{"flat charges its amount whatever the usage", flat, 0, 2900},
		{"flat ignores large usage", flat, 1 << 40, 2900},

		{"per unit zero usage is free", perUnit, 0, 0},
		{"per unit negative usage is free, never paid back", perUnit, -5000, 0},
		{"package negative usage is free", pkg, -1, 0},
		{"graduated negative usage is free", graduated, -1001, 0},
		{"volume negative usage is free", volume, -1, 0},
		{"a negative usage near the int64 minimum is free, not wrapped past the allowance", included, math.MinInt64 + 1, 0},
		{"the int64 minimum is free", included, math.MinInt64, 0},
		{"per unit 999 units round half even down", perUnit, 999, 40}, // 39.96
		{"per unit 1000 units", perUnit, 1000, 40},                    // 40
		{"per unit 1001 units", perUnit, 1001, 40},                    // 40.04
		{"per unit 12.48 rounds down to 12", perUnit, 312, 12},
		{"per unit tie 37.5 rounds to even 38", Price{Key: "x", Model: PerUnit, Meter: "m", UnitAmount: d("0.5")}, 75, 38},
		{"per unit 2.5 cents tie rounds to even 2", Price{Key: "x", Model: PerUnit, Meter: "m", UnitAmount: d("0.5")}, 5, 2},

		{"package zero usage is free", pkg, 0, 0},
		{"package one below a boundary is one package", pkg, 999, 150},
		{"package at the boundary is one package", pkg, 1000, 150},
		{"package one above starts a second package", pkg, 1001, 300},

		{"graduated zero usage is free", graduated, 0, 0},
		{"graduated one below first boundary", graduated, 999, 0},
		{"graduated at first boundary", graduated, 1000, 0},
		{"graduated one above first boundary enters tier 2 with its flat fee", graduated, 1001, 100}, // 0.5 + 100 = 100.5 → 100 (even)
		{"graduated one below second boundary", graduated, 9999, 4600},                               // 8999*0.5=4499.5+100=4599.5 → 4600
		{"graduated at second boundary", graduated, 10000, 4600},                                     // 9000*0.5=4500+100
		{"graduated one above second boundary", graduated, 10001, 4600},                              // +0.25 = 4600.25

		{"volume zero usage is free", volume, 0, 0},
		{"volume one below first boundary", volume, 999, 0},
		{"volume at first boundary", volume, 1000, 0},
		{"volume one above first boundary prices every unit at tier 2", volume, 1001, 600},  // 500.5+100 → 600 (600.5 → even 600)
		{"volume one below second boundary", volume, 9999, 5100},                            // 4999.5+100 → 5099.5 → 5100
		{"volume at second boundary", volume, 10000, 5100},                                  // 5000+100
		{"volume one above second boundary drops to the cheaper tier", volume, 10001, 2500}, // 2500.25 → 2500

		{"included allowance: below it is free", included, 999, 0},
		{"included allowance: at it is free", included, 1000, 0},
		{"included allowance: one above is one billable unit", included, 1001, 2},

		{"very large usage at a sub-cent price fits", perUnit, math.MaxInt64, 368934881474191032}, // 9223372036854775807*0.04
		{"very large usage in packages fits", Price{Key: "x", Model: Package, Meter: "m", PackageSize: 1 << 32, PackageAmount: 1}, math.MaxInt64, 1 << 31},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := c.price.Apply(c.q)
			if err != nil {
				t.Fatalf("apply: %v", err)
			}
			got, err := RoundMinor(p.Exact)
			if err != nil {
				t.Fatalf("round: %v", err)
			}
			if got != c.want {
				t.Fatalf("amount for %d units: got %d (exact %s), want %d", c.q, got, p.Exact, c.want)
			}
		})
	}
}

func TestGraduatedTierBreakdown(t *testing.T) {
	p, err := graduated.Apply(10001)
	if err != nil {
		t.Fatal(err)
	}
	want := []TierUse{
		{Tier: 1, First: 1, Last: 1000, Quantity: 1000},
		{Tier: 2, First: 1001, Last: 10000, Quantity: 9000, FlatAmount: 100},
		{Tier: 3, First: 10001, Last: 10001, Quantity: 1},
	}
	if len(p.Tiers) != len(want) {
		t.Fatalf("tiers: got %+v", p.Tiers)
	}
	for i, w := range want {
		g := p.Tiers[i]
		if g.Tier != w.Tier || g.First != w.First || g.Last != w.Last || g.Quantity != w.Quantity || g.FlatAmount != w.FlatAmount {
			t.Errorf("tier %d: got %+v, want %+v", i, g, w)
		}
	}
	if p.Exact.String() != "4600.25" {
		t.Errorf("exact: got %s, want 4600.25", p.Exact)
	}
}

func TestOverflowIsRefusedNotWrapped(t *testing.T) {
	p := Price{Key: "x", Model: PerUnit, Meter: "m", UnitAmount: d("1000")}
	priced, err := p.Apply(math.MaxInt64)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := RoundMinor(priced.Exact); !errors.Is(err, ErrOverflow) {
		t.Fatalf("want ErrOverflow, got %v", err)
	}
	if _, err := addMinor(math.MaxInt64, 1); !errors.Is(err, ErrOverflow) {
		t.Fatalf("sum: want ErrOverflow, got %v", err)
	}
}

// A meter's usage past int64 reads as int64's largest or smallest value
// (meter.SaturatingSum): the invoice is refused, not priced as usage at a
// tiny unit amount, nor as none.
func TestUsagePastInt64IsRefused(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	plan := Plan{ID: "tokens", Version: 1, Currency: "usd", Definition: Definition{Prices: []Price{
		{Key: "tokens", Model: PerUnit, Meter: "tokens", UnitAmount: d("0.000001")},
	}}}
	segs := []Segment{{Period: march, Plan: plan}}
	for _, q := range []int64{math.MaxInt64, math.MinInt64} {
		_, err := Compute(Inputs{AccountID: "acct_1", Currency: "usd", Period: march, Segments: segs,
			Usage: []map[string]int64{{"tokens": q}}, EventCount: 1})
		if !errors.Is(err, ErrOverflow) || !strings.Contains(err.Error(), "meter tokens") {
			t.Errorf("usage %d: %v, want ErrOverflow naming the meter", q, err)
		}
	}
	if _, err := Compute(Inputs{AccountID: "acct_1", Currency: "usd", Period: march, Segments: segs,
		Usage: []map[string]int64{{"tokens": math.MaxInt64 - 1}}, EventCount: 1}); err != nil {
		t.Errorf("usage just short of int64's largest value: %v", err)
	}
}

func TestInvalidPricesAreRejectedWithEveryProblem(t *testing.T) {
	d := Definition{Prices: []Price{
		{Key: "a", Model: Graduated, Meter: "m", Tiers: []Tier{{UpTo: up(10)}, {UpTo: up(5)}}},
		{Key: "a", Model: Package, Meter: "m"},
		{Key: "c", Model: "stairs"},
	}}
	err := d.Validate()
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("want ErrInvalid, got %v", err)
	}
	for _, want := range []string{"up_to must increase", "last tier must be unbounded", `key "a" twice`, "package_size", "stairs", "meter required"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q: %v", want, err)
		}
	}
}

// A plan is written by hand. A misspelled key, or a field of another
// model, decoded leniently bills something other than what was written;
// each is refused, naming the problem. The seeded plans and a definition
// written back as the invoicer stores it still parse.
func TestADefinitionRefusesKeysAndFieldsItDoesNotUse(t *testing.T) {
	for _, c := range []struct{ name, def, want string }{
		{"a misspelled allowance (billed the first 100,000 calls)", `{"prices":[
			{"key":"api_calls","model":"per_unit","meter":"api_calls","unit_amount":"0.04","include":100000}]}`, `unknown field "include"`},
		{"a flat fee given as unit_amount (billed 0)", `{"prices":[{"key":"base","model":"flat","unit_amount":"2900"}]}`, `unit_amount: not used by model "flat"`},
		{"tiers on a per_unit price (billed 0)", `{"prices":[
			{"key":"api_calls","model":"per_unit","meter":"api_calls","tiers":[{"up_to":null,"unit_amount":"0.04"}]}]}`, `tiers: not used by model "per_unit"`},
		{"an allowance on a flat fee", `{"prices":[{"key":"base","model":"flat","amount":100,"included":5}]}`, `included: not used by model "flat"`},
		{"a misspelled tier key", `{"prices":[
			{"key":"api_calls","model":"graduated","meter":"api_calls","tiers":[{"up_to":null,"unit_price":"0.04"}]}]}`, `unknown field "unit_price"`},
		{"prices misspelled (a paid plan that charged nothing)", `{"price":[{"key":"base","model":"flat","amount":2900}]}`, `unknown field "price"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseDefinition([]byte(c.def))
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v; want ErrInvalid naming %q", err, c.want)
			}
		})
	}
	t.Run("keys in limits the invoicer does not read are the edge's business", func(t *testing.T) {
		d, err := ParseDefinition([]byte(`{"limits":{"requests_per_second":5,"burst":10,"requests_per_day":9},"prices":[]}`))
		if err != nil || d.Limits.Burst != 10 {
			t.Fatalf("%+v, %v", d, err)
		}
	})
	t.Run("a definition written back parses as it was", func(t *testing.T) {
		in := Definition{UpgradeURL: "https://example.test/up", Prices: []Price{
			{Key: "base", Model: Flat},
			{Key: "calls", Model: Graduated, Meter: "m", Included: 10, Tiers: []Tier{{UpTo: up(100), UnitAmount: d("0.5"), FlatAmount: 7}, {}}},
		}}
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		out, err := ParseDefinition(b)
		if err != nil || len(out.Prices) != 2 || out.Prices[1].Tiers[0].FlatAmount != 7 || out.UpgradeURL != in.UpgradeURL {
			t.Fatalf("%s parsed as %+v, %v", b, out, err)
		}
	})
}

// reference prices a quantity the slow, obvious way: unit by unit, with
// rationals. It shares no code with Apply.
func reference(p Price, q int64) *big.Rat {
	total := new(big.Rat)
	rat := func(x decimal.Decimal) *big.Rat { r, _ := new(big.Rat).SetString(x.String()); return r }
	billable := q - p.Included
	if billable < 0 {
		billable = 0
	}
	switch p.Model {
	case Flat:
		total.SetInt64(p.Amount)
	case PerUnit:
		for i := int64(0); i < billable; i++ {
			total.Add(total, rat(p.UnitAmount))
		}
	case Package:
		for i := int64(0); i < billable; i += p.PackageSize {
			total.Add(total, new(big.Rat).SetInt64(p.PackageAmount))
		}
	case Graduated:
		entered := map[int]bool{}
		for u := int64(1); u <= billable; u++ {
			for ti, t := range p.Tiers {
				if t.UpTo == nil || u <= *t.UpTo {
					total.Add(total, rat(t.UnitAmount))
					if !entered[ti] {
						entered[ti] = true
						total.Add(total, new(big.Rat).SetInt64(t.FlatAmount))
					}
					break
				}
			}
		}
	case Volume:
		if billable == 0 {
			break
		}
		for _, t := range p.Tiers {
			if t.UpTo == nil || billable <= *t.UpTo {
				for u := int64(0); u < billable; u++ {
					total.Add(total, rat(t.UnitAmount))
				}
				total.Add(total, new(big.Rat).SetInt64(t.FlatAmount))
				break
			}
		}
	}
	return total
}

// referenceRound rounds half to even by comparing the fractional part
// with one half.
func referenceRound(x *big.Rat) int64 {
	fl := new(big.Int).Div(x.Num(), x.Denom()) // floor for non-negative x
	frac := new(big.Rat).Sub(x, new(big.Rat).SetInt(fl))
	switch frac.Cmp(big.NewRat(1, 2)) {
	case 1:
		fl.Add(fl, big.NewInt(1))
	case 0:
		if fl.Bit(0) == 1 {
			fl.Add(fl, big.NewInt(1))
		}
	}
	return fl.Int64()
}

func TestPricingMatchesASimpleReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 2026))
	amount := func() decimal.Decimal {
		return decimal.New(rng.Int64N(100000), -int32(rng.IntN(5)))
	}
	randomPrice := func() Price {
		p := Price{Key: "p", Meter: "m", Included: rng.Int64N(3) * rng.Int64N(200)}
		switch rng.IntN(5) {
		case 0:
			p.Model, p.Amount = Flat, rng.Int64N(1e6)
			p.Meter, p.Included = "", 0 // a flat fee reads no meter
		case 1:
			p.Model, p.UnitAmount = PerUnit, amount()
		case 2:
			p.Model, p.PackageSize, p.PackageAmount = Package, 1+rng.Int64N(300), rng.Int64N(1e5)
		default:
			p.Model = Graduated
			if rng.IntN(2) == 0 {
				p.Model = Volume
			}
			var bound int64
			for i := rng.IntN(4); i > 0; i-- {
				bound += 1 + rng.Int64N(500)
				p.Tiers = append(p.Tiers, Tier{UpTo: up(bound), UnitAmount: amount(), FlatAmount: rng.Int64N(3) * rng.Int64N(1000)})
			}
			p.Tiers = append(p.Tiers, Tier{UnitAmount: amount(), FlatAmount: rng.Int64N(1000)})
		}
		return p
	}
	for i := 0; i < 3000; i++ {
		p := randomPrice()
		if err := p.Validate(); err != nil {
			t.Fatalf("generated an invalid price %+v: %v", p, err)
		}
		q := rng.Int64N(2500)
		got, err := p.Apply(q)
		if err != nil {
			t.Fatal(err)
		}
		want := reference(p, q)
		if got.Exact.Rat().Cmp(want) != 0 {
			t.Fatalf("price %+v at %d: exact %s, reference %s", p, q, got.Exact, want.FloatString(6))
		}
		gotMinor, err := RoundMinor(got.Exact)
		if err != nil {
			t.Fatal(err)
		}
		if w := referenceRound(want); gotMinor != w {
			t.Fatalf("price %+v at %d: rounded %d, reference %d", p, q, gotMinor, w)
		}
	}
}

func TestMidPeriodPlanChangeIsProratedAndPricedPerSegment(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	change := time.Date(2026, 3, 11, 0, 0, 0, 0, time.UTC) // 10 of 31 days on the old plan
	starter := Plan{ID: "starter", Version: 1, Currency: "usd", Definition: Definition{Prices: []Price{
		{Key: "base", Model: Flat, Amount: 2900},
		{Key: "calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d("0.04"), Included: 100},
	}}}
	growth := Plan{ID: "growth", Version: 2, Currency: "usd", Definition: Definition{Prices: []Price{
		{Key: "base", Model: Flat, Amount: 9900},
		{Key: "calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d("0.02"), Included: 100},
	}}}
	free := Plan{ID: "free", Version: 1, Currency: "usd"}
	plans := map[string]Plan{"starter": starter, "growth": growth}
	get := func(id string, _ int) (Plan, error) { return plans[id], nil }
	end := change
	subs := []Subscription{
		{PlanID: "starter", PlanVersion: 1, StartsAt: march.Start.AddDate(0, -2, 0), EndsAt: &end},
		{PlanID: "growth", PlanVersion: 2, StartsAt: change},
	}
	segs, err := Segments(march, subs, get, []PlanVersion{{Plan: free}})
	if err != nil {
		t.Fatal(err)
	}
	if len(segs) != 2 || segs[0].Plan.ID != "starter" || !segs[0].End.Equal(change) || segs[1].Plan.ID != "growth" {
		t.Fatalf("segments: %+v", segs)
	}
	inv, err := Compute(Inputs{AccountID: "acct_1", Currency: "usd", Period: march, Segments: segs,
		Usage: []map[string]int64{{"api_calls": 1100}, {"api_calls": 5100}}, EventCount: 6200})
	if err != nil {
		t.Fatal(err)
	}
	// base 2900*10/31 = 935.48 → 935; calls (1100-100)*0.04 = 40;
	// base 9900*21/31 = 6706.45 → 6706; calls (5100-100)*0.02 = 100.
	want := []int64{935, 40, 6706, 100}
	if len(inv.Lines) != len(want) {
		t.Fatalf("lines: %+v", inv.Lines)
	}
	for i, w := range want {
		if inv.Lines[i].Amount != w {
			t.Errorf("line %d (%s %s): got %d, want %d", i+1, inv.Lines[i].PlanID, inv.Lines[i].PriceKey, inv.Lines[i].Amount, w)
		}
	}
	if inv.Lines[0].Proration != "864000/2678400" {
		t.Errorf("proration: got %q", inv.Lines[0].Proration)
	}
	if inv.Total != 935+40+6706+100 {
		t.Errorf("total: got %d", inv.Total)
	}
	again, _ := Compute(Inputs{AccountID: "acct_1", Currency: "usd", Period: march, Segments: segs,
		Usage: []map[string]int64{{"api_calls": 1100}, {"api_calls": 5100}}, EventCount: 6200, Watermark: time.Now()})
	if again.Fingerprint.Hash != inv.Fingerprint.Hash {
		t.Error("the same inputs under another watermark hash differently")
	}
	other, _ := Compute(Inputs{AccountID: "acct_1", Currency: "usd", Period: march, Segments: segs,
		Usage: []map[string]int64{{"api_calls": 1100}, {"api_calls": 5101}}, EventCount: 6201})
	if other.Fingerprint.Hash == inv.Fingerprint.Hash {
		t.Error("one more event did not change the fingerprint")
	}
}

func TestPeriodsFollowTheAccountTimeZone(t *testing.T) {
	tokyo, err := time.LoadLocation("Asia/Tokyo")
	if err != nil {
		t.Fatal(err)
	}
	p := MonthPeriod(time.Date(2026, 2, 28, 16, 0, 0, 0, time.UTC), tokyo) // 1 March 01:00 in Tokyo
	if want := time.Date(2026, 2, 28, 15, 0, 0, 0, time.UTC); !p.Start.Equal(want) {
		t.Errorf("start: got %s, want %s", p.Start, want)
	}
	if want := time.Date(2026, 3, 31, 15, 0, 0, 0, time.UTC); !p.End.Equal(want) {
		t.Errorf("end: got %s, want %s", p.End, want)
	}
}

func TestAMonthWhoseFirstMidnightNeverHappenedStartsAtTheJump(t *testing.T) {
	asuncion, err := time.LoadLocation("America/Asuncion")
	if err != nil {
		t.Fatal(err)
	}
	// Clocks jumped from 00:00 to 01:00 on 1 October 2023 in Asuncion.
	p := MonthPeriod(time.Date(2023, 10, 15, 12, 0, 0, 0, time.UTC), asuncion)
	if want := time.Date(2023, 10, 1, 4, 0, 0, 0, time.UTC); !p.Start.Equal(want) {
		t.Errorf("start: got %s, want %s", p.Start, want)
	}
	if want := time.Date(2023, 11, 1, 3, 0, 0, 0, time.UTC); !p.End.Equal(want) {
		t.Errorf("end: got %s, want %s", p.End, want)
	}
}

func TestCurrenciesHaveTheirMinorUnits(t *testing.T) {
	for cur, want := range map[string]string{"usd": "123.45", "jpy": "12345", "kwd": "12.345"} {
		if got := FormatMinor(12345, cur); got != want {
			t.Errorf("%s: got %s, want %s", cur, got, want)
		}
	}
	if _, err := MinorExponent("xxx"); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown currency: want ErrInvalid, got %v", err)
	}
}

// Stripe takes the three-decimal currencies only in multiples of 10
// thousandths, so their lines round once, half to even, to a whole 10:
// from the exact amount (5.4 fils is 10, where rounding to 5 first and then
// to tens would give 0), prorated flat fees too. Other currencies keep
// whole minor units.
func TestThreeDecimalCurrencyLinesRoundToTensOfThousandths(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	half := time.Date(2026, 3, 16, 12, 0, 0, 0, time.UTC) // 15.5 of 31 days
	for _, c := range []struct {
		currency string
		calls    int64
		unit     string
		want     []int64 // base for half the month, then calls
	}{
		{"kwd", 7, "1", []int64{500, 10}},   // 502.5 → 500; 7 → 10
		{"kwd", 9, "0.6", []int64{500, 10}}, // 5.4 → 10
		{"kwd", 25, "1", []int64{500, 20}},  // 25 → 20 (half to even)
		{"bhd", 35, "1", []int64{500, 40}},  // 35 → 40 (half to even)
		{"usd", 7, "1", []int64{502, 7}},    // 502.5 → 502; whole cents
		{"usd", 9, "0.6", []int64{502, 5}},  // 5.4 → 5
	} {
		pl := Plan{ID: "p", Version: 1, Currency: c.currency, Definition: Definition{Prices: []Price{
			{Key: "base", Model: Flat, Amount: 1005},
			{Key: "calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d(c.unit)},
		}}}
		end := half
		segs, err := Segments(march, []Subscription{{PlanID: "p", PlanVersion: 1, StartsAt: march.Start, EndsAt: &end}},
			func(string, int) (Plan, error) { return pl, nil }, []PlanVersion{{Plan: Plan{ID: "free", Version: 1, Currency: "usd"}}})
		if err != nil {
			t.Fatal(err)
		}
		usage := make([]map[string]int64, len(segs))
		for i := range usage {
			usage[i] = map[string]int64{}
		}
		usage[0]["api_calls"] = c.calls
		inv, err := Compute(Inputs{AccountID: "acct_1", Currency: c.currency, Period: march, Segments: segs, Usage: usage})
		if err != nil {
			t.Fatalf("%s: %v", c.currency, err)
		}
		if got := []int64{inv.Lines[0].Amount, inv.Lines[1].Amount}; got[0] != c.want[0] || got[1] != c.want[1] {
			t.Errorf("%s, %d calls at %s: lines %v, want %v", c.currency, c.calls, c.unit, got, c.want)
		}
		for _, l := range inv.Lines {
			if _, err := StripeAmount(l.Amount, c.currency); err != nil {
				t.Errorf("%s: line %d of %d does not go to Stripe: %v", c.currency, l.No, l.Amount, err)
			}
		}
	}
}

// The free plan is priced in one currency and charges nothing: it covers
// an account's time on no subscription whatever the account's currency. A
// plan that charges something must be in the account's currency.
func TestFreeTimeOfAnAccountInAnotherCurrency(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	free := Plan{ID: "free", Version: 1, Currency: "usd", Definition: Definition{Prices: []Price{
		{Key: "api_calls", Model: PerUnit, Meter: "api_calls", UnitAmount: d("0")}}}}
	pro := Plan{ID: "pro", Version: 1, Currency: "eur", Definition: Definition{Prices: []Price{{Key: "base", Model: Flat, Amount: 3100}}}}
	segs, err := Segments(march, []Subscription{{PlanID: "pro", PlanVersion: 1, StartsAt: time.Date(2026, 3, 11, 0, 0, 0, 0, time.UTC)}},
		func(string, int) (Plan, error) { return pro, nil }, []PlanVersion{{Plan: free}})
	if err != nil || len(segs) != 2 {
		t.Fatalf("segments %+v, %v", segs, err)
	}
	in := Inputs{AccountID: "acct_eur", Currency: "eur", Period: march, Segments: segs,
		Usage: []map[string]int64{{"api_calls": 5}, {"api_calls": 5}}}
	inv, err := Compute(in)
	if err != nil {
		t.Fatalf("an eur account's month that starts on the free plan: %v", err)
	}
	if inv.Total != 2100 { // 3100 × 21/31
		t.Errorf("total %d, want 2100", inv.Total)
	}
	in.Segments[0].Plan.Definition.Prices[0].UnitAmount = d("1") // a usd plan that charges
	if _, err := Compute(in); !errors.Is(err, ErrInvalid) {
		t.Errorf("a charging usd plan on an eur account: %v, want it refused", err)
	}
}

// RoundLine rounds once, exactly: decimal division would round to 16
// places first and then again.
func TestRoundLineRoundsOnceExactly(t *testing.T) {
	for _, c := range []struct {
		exact string
		want  int64
	}{{"14.9999999999999995", 10}, {"5.00000000000000001", 10}, {"15", 20}, {"25", 20}, {"-5.4", -10}, {"4.99999999999999999", 0}} {
		if got, err := RoundLine(d(c.exact), "kwd"); err != nil || got != c.want {
			t.Errorf("RoundLine(%s, kwd) = %d, %v; want %d", c.exact, got, err, c.want)
		}
	}
}

// A plan change at a fraction of a second (a subscription started at now(),
// with microseconds) cuts the period at its whole second: the segments'
// seconds add up to the period's, and the flat fees' proration with them.
func TestASubSecondPlanChangeCutsAtItsWholeSecond(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	change := time.Date(2026, 3, 11, 0, 0, 0, 500_000_000, time.UTC)
	plans := map[string]Plan{
		"starter": {ID: "starter", Version: 1, Currency: "usd", Definition: Definition{Prices: []Price{{Key: "base", Model: Flat, Amount: 2900}}}},
		"growth":  {ID: "growth", Version: 1, Currency: "usd", Definition: Definition{Prices: []Price{{Key: "base", Model: Flat, Amount: 9900}}}},
	}
	get := func(id string, _ int) (Plan, error) { return plans[id], nil }
	end := change
	segs, err := Segments(march, []Subscription{
		{PlanID: "starter", PlanVersion: 1, StartsAt: march.Start.AddDate(0, -1, 0), EndsAt: &end},
		{PlanID: "growth", PlanVersion: 1, StartsAt: change},
	}, get, []PlanVersion{{Plan: Plan{ID: "free", Version: 1, Currency: "usd"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(segs) != 2 || !segs[0].End.Equal(change.Truncate(time.Second)) {
		t.Fatalf("segments %+v, want a cut at %s", segs, change.Truncate(time.Second))
	}
	if got, want := segs[0].Seconds()+segs[1].Seconds(), march.Seconds(); got != want {
		t.Fatalf("segments cover %d s of a %d s period", got, want)
	}
}

// Free time is priced under the free version in force when it passed: the
// newest published by then. Before, every close priced all of a period's
// free time under the newest version at the close, one published on 20
// March (or after March ended) included.
func TestFreeTimeIsPricedUnderTheFreeVersionInForce(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	v := func(n int, since time.Time) PlanVersion {
		return PlanVersion{Plan: Plan{ID: "free", Version: n, Currency: "usd"}, Since: since}
	}
	installed := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	mid := time.Date(2026, 3, 20, 9, 30, 0, 250_000_000, time.UTC)
	pro := Plan{ID: "pro", Version: 1, Currency: "usd"}
	get := func(string, int) (Plan, error) { return pro, nil }
	at := func(d, h int) time.Time { return time.Date(2026, 3, d, h, 0, 0, 0, time.UTC) }
	for _, c := range []struct {
		name string
		free []PlanVersion
		subs []Subscription
		want []string // plan@version from–to
	}{
		{"one version covers the period", []PlanVersion{v(1, installed)}, nil, []string{"free@1 1-0 to 32-0"}},
		{"a version published mid-period applies from then", []PlanVersion{v(1, installed), v(2, mid)}, nil,
			[]string{"free@1 1-0 to 20-9", "free@2 20-9 to 32-0"}},
		{"a version published after the period does not apply to it", []PlanVersion{v(1, installed), v(2, at(31, 0).AddDate(0, 0, 2))}, nil,
			[]string{"free@1 1-0 to 32-0"}},
		{"time before the first publication is on the oldest version", []PlanVersion{v(1, at(5, 0)), v(2, at(10, 0))}, nil,
			[]string{"free@1 1-0 to 10-0", "free@2 10-0 to 32-0"}},
		{"a subscription covering the publication hides it", []PlanVersion{v(1, installed), v(2, mid)},
			[]Subscription{{PlanID: "pro", PlanVersion: 1, StartsAt: at(15, 0)}},
			[]string{"free@1 1-0 to 15-0", "pro@1 15-0 to 32-0"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			segs, err := Segments(march, c.subs, get, c.free)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range segs {
				end := s.End.Day()
				if s.End.Equal(march.End) {
					end = 32
				}
				got = append(got, fmt.Sprintf("%s@%d %d-%d to %d-%d", s.Plan.ID, s.Plan.Version, s.Start.Day(), s.Start.Hour(), end, s.End.Hour()))
			}
			if strings.Join(got, ", ") != strings.Join(c.want, ", ") {
				t.Fatalf("segments %v, want %v", got, c.want)
			}
			for _, s := range segs {
				if s.Start.Nanosecond() != 0 || s.End.Nanosecond() != 0 {
					t.Fatalf("a cut inside a second: %v", s.Period)
				}
			}
		})
	}
}

// Two stretches next to each other on one version are one segment; a
// version the account returns to after a lapse is a segment of its own,
// with its own allowance, as docs/billing-rules.md says (a new
// subscription starts a new cycle, as in Stripe).
func TestAVersionReturnedToAfterALapseIsASegmentOfItsOwn(t *testing.T) {
	march := MonthPeriod(time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC), time.UTC)
	starter := Plan{ID: "starter", Version: 1, Currency: "usd"}
	get := func(string, int) (Plan, error) { return starter, nil }
	free := []PlanVersion{{Plan: Plan{ID: "free", Version: 1, Currency: "usd"}}}
	at := func(d, h int) time.Time { return time.Date(2026, 3, d, h, 0, 0, 0, time.UTC) }
	ends := func(t time.Time) *time.Time { return &t }
	for _, c := range []struct {
		name string
		subs []Subscription
		want []string
	}{
		{"back to back", []Subscription{
			{PlanID: "starter", PlanVersion: 1, StartsAt: march.Start, EndsAt: ends(at(15, 0))},
			{PlanID: "starter", PlanVersion: 1, StartsAt: at(15, 0)},
		}, []string{"starter@1"}},
		{"after an hour's lapse", []Subscription{
			{PlanID: "starter", PlanVersion: 1, StartsAt: march.Start, EndsAt: ends(at(15, 0))},
			{PlanID: "starter", PlanVersion: 1, StartsAt: at(15, 1)},
		}, []string{"starter@1", "free@1", "starter@1"}},
	} {
		segs, err := Segments(march, c.subs, get, free)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var got []string
		for _, s := range segs {
			got = append(got, fmt.Sprintf("%s@%d", s.Plan.ID, s.Plan.Version))
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: segments %v, want %v", c.name, got, c.want)
		}
	}
}
