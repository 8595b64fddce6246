package invoicer

import (
	"errors"
	"testing"
)

func TestStripeAmountIsInStripesUnits(t *testing.T) {
	for _, c := range []struct {
		minor    int64
		currency string
		want     int64
		err      error
	}{
		{2900, "usd", 2900, nil},
		{500, "jpy", 500, nil},
		{500, "isk", 50000, nil}, // 500 krónur: Stripe's ISK amounts are hundredths
		{1230, "kwd", 1230, nil},
		{1234, "kwd", 0, ErrInvalid}, // Stripe refuses a last digit other than 0
		{1 << 62, "isk", 0, ErrOverflow},
	} {
		got, err := StripeAmount(c.minor, c.currency)
		if err == nil && FromStripeAmount(got, c.currency) != c.minor {
			t.Errorf("FromStripeAmount(%d, %s) = %d, want %d back", got, c.currency, FromStripeAmount(got, c.currency), c.minor)
		}
		if got != c.want || !errors.Is(err, c.err) && !(err == nil && c.err == nil) {
			t.Errorf("StripeAmount(%d, %s) = %d, %v; want %d, %v", c.minor, c.currency, got, err, c.want, c.err)
		}
	}
}
