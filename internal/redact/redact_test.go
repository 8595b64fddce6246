package redact

import "testing"

func TestURLHidesUserInformation(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"https://user:s3cret@api.internal/base", "https://xxxxx@api.internal/base"},
		{"https://user:s3cret@::bad", "https://xxxxx@::bad"},
		{"user:s3cret@host:80", "xxxxx@host:80"},
		{"https://api.internal/a@b", "https://xxxxx@b"}, // cut to be safe: an @ may end a password
		{"https://api.internal/a", "https://api.internal/a"},
		{"not a url", "not a url"},
		{"https://u:p@w@host/x?y=@", "https://xxxxx@"}, // all before the last @
		{"https://svc:AAA@BBB/CCC@api.internal", "https://xxxxx@api.internal"},
		{"http://svc:AAA@BBB?CCC@stripe.internal", "http://xxxxx@stripe.internal"},
		{"https://svc:AAA@BB:B/CCC@api.internal", "https://xxxxx@api.internal"},
		// A password holding what would end the authority: the URL does
		// not parse, and all before its last @ goes.
		{"https://svc:pa/ss-SECRET@api.internal:8443", "https://xxxxx@api.internal:8443"},
		{"http://u:pw?SECRET@host:80", "http://xxxxx@host:80"},
		{"http://u:pw#SECRET@host:80/p", "http://xxxxx@host:80/p"},
		// ... and when the URL parses all the same, the password read as
		// its path or query.
		{"http://svc:8080?SECRET@stripe.internal", "http://xxxxx@stripe.internal"},
		{"https://svc:8443/SECRET@api.internal", "https://xxxxx@api.internal"},
		{"http://svc:8080#SECRET@h/x?y", "http://xxxxx@h/x?y"},
		{"https://u:pw@host/x@y", "https://xxxxx@y"},
	} {
		if got := URL(c.in); got != c.want {
			t.Errorf("URL(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestHasUserInfo(t *testing.T) {
	for s, want := range map[string]bool{
		"https://user:pw@api.internal":                 true,
		"http://svc:8080?SECRET@stripe.internal":       true,
		"http://svc:8080#SECRET@stripe.internal/x":     true,
		"https://svc:pa/ss@api.internal:8443":          true, // does not parse
		"https://api.internal":                         false,
		"https://registry.internal/@acme":              false, // a path's @
		"https://api.internal/v1?contact=ops@acme.com": false,
		"https://api.internal/users/me@x":              false,
	} {
		if got := HasUserInfo(s); got != want {
			t.Errorf("HasUserInfo(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestURLAndQueryHidesTheQueryToo(t *testing.T) {
	for in, want := range map[string]string{
		"https://proxy.internal/?api_key=k":   "https://proxy.internal/?xxxxx",
		"https://u:p@proxy.internal/v1#k":     "https://xxxxx@proxy.internal/v1?xxxxx",
		"http://svc:8080?SECRET@host/x?key=k": "http://xxxxx@host/x?xxxxx",
		"https://proxy.internal/v1":           "https://proxy.internal/v1",
	} {
		if got := URLAndQuery(in); got != want {
			t.Errorf("URLAndQuery(%q) = %q, want %q", in, got, want)
		}
	}
}
