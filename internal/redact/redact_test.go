package redact

import "testing"

func TestURLHidesUserInformation(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"https://user:s3cret@api.internal/base", "https://xxxxx@api.internal/base"},
		{"https://user:s3cret@::bad", "https://xxxxx@::bad"},
		{"user:s3cret@host:80", "xxxxx@host:80"},
		{"https://api.internal/a@b", "https://api.internal/a@b"},
		{"not a url", "not a url"},
		{"https://u:p@w@host/x?y=@", "https://xxxxx@host/x?y=@"},
		// A password holding what would end the authority: the URL does
		// not parse, and all before its last @ goes.
		{"https://svc:pa/ss-SECRET@api.internal:8443", "https://xxxxx@api.internal:8443"},
		{"http://u:pw?SECRET@host:80", "http://xxxxx@host:80"},
		{"http://u:pw#SECRET@host:80/p", "http://xxxxx@host:80/p"},
	} {
		if got := URL(c.in); got != c.want {
			t.Errorf("URL(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
