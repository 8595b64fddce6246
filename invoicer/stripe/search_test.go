package stripe

import (
	"errors"
	"fmt"
	"testing"

	stripego "github.com/stripe/stripe-go/v76"
)

// Only Stripe's refusal of search itself lets EnsureCustomer go on to
// create without it; a rate limit, a bad key or a network error stops the
// sync, to be retried, rather than risk a second customer.
func TestOnlyARefusedSearchIsCreatedWithout(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&stripego.Error{HTTPStatusCode: 400, Type: stripego.ErrorTypeInvalidRequest, Msg: "Search is not available"}, true},
		{fmt.Errorf("wrapped: %w", &stripego.Error{HTTPStatusCode: 400, Type: stripego.ErrorTypeInvalidRequest}), true},
		{&stripego.Error{HTTPStatusCode: 429, Type: stripego.ErrorTypeInvalidRequest, Code: stripego.ErrorCodeRateLimit}, false},
		{&stripego.Error{HTTPStatusCode: 400, Type: stripego.ErrorTypeInvalidRequest, Code: stripego.ErrorCodeRateLimit}, false},
		{&stripego.Error{HTTPStatusCode: 401, Type: stripego.ErrorTypeInvalidRequest}, false},
		{&stripego.Error{HTTPStatusCode: 500, Type: stripego.ErrorTypeAPI}, false},
		{errors.New("connection refused"), false},
	} {
		if got := searchUnavailable(c.err); got != c.want {
			t.Errorf("%v: searchUnavailable = %v, want %v", c.err, got, c.want)
		}
	}
}
