package invoicer

import (
	"errors"
	"fmt"
	"math/big"

	"github.com/shopspring/decimal"
)

// minorExponents is how many decimal places each supported currency's minor
// unit has (ISO 4217). A currency missing here cannot be priced: guessing
// the exponent would bill a hundred times too much or too little.
var minorExponents = map[string]int32{
	"usd": 2, "eur": 2, "gbp": 2, "chf": 2, "cad": 2, "aud": 2, "nzd": 2,
	"sek": 2, "nok": 2, "dkk": 2, "pln": 2, "czk": 2, "inr": 2, "brl": 2,
	"mxn": 2, "sgd": 2, "hkd": 2, "cny": 2, "zar": 2,
	"jpy": 0, "krw": 0, "vnd": 0, "clp": 0, "isk": 0,
	"kwd": 3, "bhd": 3, "omr": 3, "jod": 3, "tnd": 3,
}

// MinorExponent returns the number of decimal places of currency's minor
// unit: 2 for usd (cents), 0 for jpy, 3 for kwd.
func MinorExponent(currency string) (int32, error) {
	e, ok := minorExponents[currency]
	if !ok {
		return 0, fmt.Errorf("%w: unsupported currency %q", ErrInvalid, currency)
	}
	return e, nil
}

// ErrOverflow means an amount does not fit in int64 minor units. The invoice
// is refused rather than wrapped around.
var ErrOverflow = errors.New("amount overflows int64 minor units")

var (
	maxInt64 = decimal.NewFromBigInt(new(big.Int).SetInt64(1<<63-1), 0)
	minInt64 = decimal.NewFromBigInt(new(big.Int).SetInt64(-1<<63), 0)
)

// RoundMinor is the project's one rounding rule: an exact amount in minor
// units is rounded half to even ("banker's rounding") to a whole minor
// unit, once per invoice line. See docs/billing-rules.md.
func RoundMinor(exact decimal.Decimal) (int64, error) {
	r := exact.RoundBank(0)
	if r.GreaterThan(maxInt64) || r.LessThan(minInt64) {
		return 0, fmt.Errorf("%w: %s", ErrOverflow, exact.String())
	}
	return r.IntPart(), nil
}

// LineStep is the smallest amount, in minor units, a line of currency may
// come to: 1, but 10 for the three-decimal currencies, which Stripe takes
// only in multiples of 10 thousandths (a hundredth of the major unit).
func LineStep(currency string) int64 {
	switch currency {
	case "kwd", "bhd", "omr", "jod", "tnd":
		return 10
	}
	return 1
}

// RoundLine is RoundMinor to a whole LineStep of currency: the exact amount
// is rounded half to even once, to the nearest multiple of the step.
func RoundLine(exact decimal.Decimal, currency string) (int64, error) {
	step := LineStep(currency)
	if step == 1 {
		return RoundMinor(exact)
	}
	// Exactly, in rationals: decimal division would round to 16 places
	// first, a second rounding.
	return prorate(exact, 1, 1, step)
}

// addMinor adds two int64 amounts, refusing to wrap around.
func addMinor(a, b int64) (int64, error) {
	s := a + b
	if (b > 0 && s < a) || (b < 0 && s > a) {
		return 0, fmt.Errorf("%w: %d + %d", ErrOverflow, a, b)
	}
	return s, nil
}

// FormatMinor renders minor units as a decimal string in major units, e.g.
// 12345 usd → "123.45", 500 jpy → "500".
func FormatMinor(amount int64, currency string) string {
	e, err := MinorExponent(currency)
	if err != nil {
		return fmt.Sprintf("%d", amount)
	}
	return decimal.New(amount, -e).StringFixed(e)
}
