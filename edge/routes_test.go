package edge

import "testing"

func TestRouterMatchesTemplatesInOrder(t *testing.T) {
	r, err := NewRouter([]RouteConfig{
		{Pattern: "/v1/widgets/{id}", Methods: []string{"GET"}, Scopes: []string{"widgets:read"}},
		{Pattern: "/v1/widgets/{id}", Methods: []string{"DELETE"}, Scopes: []string{"widgets:write"}},
		{Pattern: "/v1/files/*", Scopes: []string{"files:read"}},
		{Pattern: "/v1/reports/run", Methods: []string{"GET"}, Write: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, method, path, template string
		ok, write                    bool
	}{
		{"id segment matches", "GET", "/v1/widgets/42", "/v1/widgets/{id}", true, false},
		{"method picks the entry", "DELETE", "/v1/widgets/42", "/v1/widgets/{id}", true, true},
		{"unlisted method does not match", "PUT", "/v1/widgets/42", "", false, false},
		{"extra segment does not match", "GET", "/v1/widgets/42/parts", "", false, false},
		{"empty id does not match", "GET", "/v1/widgets/", "", false, false},
		{"tail matches the rest", "GET", "/v1/files/a/b/c", "/v1/files/*", true, false},
		{"safe method marked write is a write", "GET", "/v1/reports/run", "/v1/reports/run", true, true},
		// Upstreams answer HEAD with their GET handler (Go's net/http and
		// most frameworks do), so HEAD is held to a GET route's rules, not
		// left to fall through to a later read route (or to no route).
		{"HEAD matches a route that lists GET", "HEAD", "/v1/reports/run", "/v1/reports/run", true, true},
		{"HEAD on an id matches the GET entry", "HEAD", "/v1/widgets/42", "/v1/widgets/{id}", true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := r.Match(c.method, c.path)
			if ok != c.ok || got.Template != c.template || (ok && got.Write != c.write) {
				t.Fatalf("Match(%s %s) = %+v, %v", c.method, c.path, got, ok)
			}
		})
	}
	if _, err := NewRouter([]RouteConfig{{Pattern: "nope"}, {Pattern: "/a/*/b"}, {Pattern: "/x", Methods: []string{"BREW"}}}); err == nil {
		t.Fatal("bad route table accepted")
	}
}

func TestScopes(t *testing.T) {
	cases := []struct {
		name   string
		kind   KeyKind
		scopes []string
		want   string
		ok     bool
	}{
		{"plain secret key has every scope", Secret, nil, "widgets:write", true},
		{"plain publishable key reads", Publishable, nil, "widgets:read", true},
		{"plain publishable key never writes", Publishable, nil, "widgets:write", false},
		{"exact scope", Secret, []string{"widgets:read"}, "widgets:read", true},
		{"other resource is refused", Secret, []string{"widgets:read"}, "invoices:read", false},
		{"wildcard action", Secret, []string{"widgets:*"}, "widgets:write", true},
		{"wildcard resource", Secret, []string{"*:read"}, "files:read", true},
		{"star is everything", Secret, []string{"*"}, "a:b", true},
		{"plain publishable key reads three-part scopes", Publishable, nil, "reports:daily:read", true},
		{"plain publishable key never writes three-part scopes", Publishable, nil, "reports:daily:write", false},
		{"a leading star takes more than one part", Secret, []string{"*:read"}, "reports:daily:read", true},
		{"a leading star takes at least one part", Secret, []string{"*:read"}, "read", false},
		{"a trailing star takes more than one part", Secret, []string{"widgets:*"}, "widgets:items:write", true},
		{"a trailing star takes at least one part", Secret, []string{"widgets:*"}, "widgets", false},
		{"a trailing star is under its prefix only", Secret, []string{"widgets:*"}, "gadgets:widgets:write", false},
		{"a leading star keeps its suffix", Secret, []string{"*:read"}, "reports:read:write", false},
		{"an inner star takes one part", Secret, []string{"a:*:c"}, "a:b:c", true},
		{"an inner star takes no more than one part", Secret, []string{"a:*:c"}, "a:b:b:c", false},
		{"stars at both ends", Secret, []string{"*:files:*"}, "org:files:write", true},
		{"stars at both ends need a part each", Secret, []string{"*:files:*"}, "files:write", false},
		{"stars at both ends find the middle anywhere inside", Secret, []string{"*:files:*"}, "a:b:files:c:d", true},
		{"two stars", Secret, []string{"*:*"}, "a:b:c", true},
		{"two stars need two parts", Secret, []string{"*:*"}, "a", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := HasScope(c.kind, c.scopes, c.want); got != c.ok {
				t.Fatalf("HasScope(%s, %v, %s) = %v", c.kind, c.scopes, c.want, got)
			}
		})
	}
}
