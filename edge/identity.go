package edge

import "strings"

// The identity headers: on every call it forwards, the edge tells the
// upstream who is calling, so the operator's API can serve the account's own
// data without parsing keys. The names share a prefix the edge reserves:
// whatever a caller sends under it is dropped before the edge sets its own,
// so an upstream can trust them as long as only the edge can reach it.
const (
	// IdentityPrefix is the reserved prefix of every identity header.
	IdentityPrefix = "Tollgate-"
	// HeaderAccount is the calling key's account id.
	HeaderAccount = "Tollgate-Account"
	// HeaderEnvironment is "live" or "test": a test key's calls go to the
	// sandbox upstream (or the live one when there is none) and are never
	// billed, so an upstream that serves both must keep their data apart.
	HeaderEnvironment = "Tollgate-Environment"
	// HeaderKeyID is the calling key's id (as the admin API lists it),
	// never its secret.
	HeaderKeyID = "Tollgate-Key-Id"
	// HeaderScopes is what the key may do, scopes separated by single
	// spaces. A key created without scopes is sent as what it grants:
	// "*" for a secret key, "*:read" for a publishable one.
	HeaderScopes = "Tollgate-Scopes"
	// HeaderPlan is the account's plan tier when the key was looked up.
	HeaderPlan = "Tollgate-Plan"
)

// IsIdentityHeader reports whether name is in the edge's reserved namespace,
// whatever its case, with an underscore counted as a hyphen: CGI, PHP,
// Django and Rails all read Tollgate_Account as Tollgate-Account.
func IsIdentityHeader(name string) bool {
	n := len(IdentityPrefix) - 1
	return len(name) > n && strings.EqualFold(name[:n], IdentityPrefix[:n]) && (name[n] == '-' || name[n] == '_')
}

// IsForwardingAlias reports whether name is one of the request headers the
// edge sets for the upstream (Request-Id, X-Forwarded-For, -Host, -Proto)
// or checks (MethodOverrideHeaders) spelled with an underscore for a
// hyphen: CGI, PHP, Rack and WSGI read X_Forwarded_For as X-Forwarded-For,
// so a caller's copy under that name could stand in for the edge's, or
// name a method the edge never checked.
func IsForwardingAlias(name string) bool {
	if strings.IndexByte(name, '_') < 0 {
		return false
	}
	for _, h := range [...]string{HeaderRequestID, "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if len(name) == len(h) && equalFoldDash(name, h) {
			return true
		}
	}
	for _, h := range MethodOverrideHeaders {
		if len(name) == len(h) && equalFoldDash(name, h) {
			return true
		}
	}
	return false
}

// RewriteHeaders are the request headers IIS's URL Rewrite, older Symfony
// and Zend read as the request's path: a call to a read route carrying a
// write route's path in one would be served as that route. The edge drops
// them (and their underscore spellings) before the upstream.
var RewriteHeaders = [...]string{"X-Original-Url", "X-Rewrite-Url"}

// IsRewriteHeader reports whether name is one of RewriteHeaders, in any
// case, an underscore counting as a hyphen.
func IsRewriteHeader[T ~string | ~[]byte](name T) bool {
	for _, h := range RewriteHeaders {
		if len(name) == len(h) && equalFoldDash(name, h) {
			return true
		}
	}
	return false
}

// equalFoldDash reports whether a and b (of one length) are equal under
// ASCII case folding, an underscore counting as a hyphen.
func equalFoldDash[T ~string | ~[]byte](a T, b string) bool {
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == '_' {
			x = '-'
		}
		if y == '_' {
			y = '-'
		}
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// Identity is what the identity headers say about a key's calls.
type Identity struct {
	Account, Environment, KeyID, Plan string
	Kind                              KeyKind
	Scopes                            []string
}

// IdentityOf returns the identity headers' values for calls made with k.
func IdentityOf(k *Key) Identity {
	return Identity{Account: k.AccountID, Environment: string(k.Environment), KeyID: k.ID, Plan: planName(k.Plan),
		Kind: k.Kind, Scopes: k.Scopes}
}

// AppendScopes appends the Tollgate-Scopes value to b.
func (id Identity) AppendScopes(b []byte) []byte {
	if len(id.Scopes) == 0 { // as HasScope reads an empty list
		if id.Kind == Secret {
			return append(b, '*')
		}
		return append(b, publishableScope...)
	}
	for i, s := range id.Scopes {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, s...)
	}
	return b
}
