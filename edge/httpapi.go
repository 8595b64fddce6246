package edge

import "net/http"

// ToAPIError maps an error to the one error shape every Tollgate API
// answers with: key errors, the generic domain errors and echo's HTTP
// errors, anything else as a 500. APIs with domain errors of their own map
// those first and hand the rest here, so a key error reads the same from
// the edge, the usage API and the invoice API. The result is a copy.
func ToAPIError(err error) *APIError {
	ae := *toAPIError(err)
	return &ae
}

// Bearer is the API key a request presents: "Authorization: Bearer <key>",
// or the user name of HTTP basic auth, as Stripe accepts.
func Bearer(r *http.Request) string { return keyFromAuthorization(r.Header.Get("Authorization")) }
