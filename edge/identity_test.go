package edge

import (
	"strings"
	"testing"
)

// The Tollgate-Scopes header must grant an upstream that reads it exactly
// what the edge enforces for the key, including keys created without scopes.
func TestScopesHeaderGrantsWhatTheEdgeEnforces(t *testing.T) {
	keys := []struct {
		kind   KeyKind
		scopes []string
		header string
	}{
		{Secret, nil, "*"},
		{Publishable, nil, "*:read"},
		{Secret, []string{"widgets:read", "files:*"}, "widgets:read files:*"},
		{Publishable, []string{"widgets:read"}, "widgets:read"},
		{Secret, []string{"*:read"}, "*:read"},
		{Secret, []string{"reports:*"}, "reports:*"},
	}
	wants := []string{"widgets:read", "widgets:write", "files:read", "files:write", "admin:write",
		"reports:daily:read", "reports:daily:write", "read", ":read"}
	for _, k := range keys {
		got := string(IdentityOf(&Key{Kind: k.kind, Scopes: k.scopes}).AppendScopes(nil))
		if got != k.header {
			t.Errorf("%s key with %q: Tollgate-Scopes %q, want %q", k.kind, k.scopes, got, k.header)
		}
		sent := strings.Split(got, " ")
		for _, w := range wants {
			// The header is read as a restricted key's list: no empty-list rule.
			if enforced, read := HasScope(k.kind, k.scopes, w), HasScope(k.kind, sent, w); enforced != read {
				t.Errorf("%s key with %q, %s: the edge says %v, the header %q says %v", k.kind, k.scopes, w, enforced, got, read)
			}
		}
	}
}

func TestIdentityHeaderNamespace(t *testing.T) {
	for name, want := range map[string]bool{
		"Tollgate-Account": true, "tollgate-plan": true, "TOLLGATE-X": true, "Tollgate_Environment": true,
		"Tollgate": false, "Tollgate-": true, "Tollgates-Account": false, "X-Tollgate-Account": false, "Toll-Gate": false,
	} {
		if got := IsIdentityHeader(name); got != want {
			t.Errorf("IsIdentityHeader(%q) = %v, want %v", name, got, want)
		}
	}
}
