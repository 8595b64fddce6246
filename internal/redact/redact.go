// Package redact keeps secrets out of messages that quote configuration.
package redact

import (
	"net/url"
	"strings"
)

// URL is s with the user information of its authority (user:password@)
// replaced by "xxxxx", whether or not s parses as a URL: a message quoting
// a URL it refuses would otherwise print the password in it. A password
// may hold an @ and the /, ? or # that would end the authority before it,
// and then even a URL that parses reads it as its path or query: so
// everything before the last @ goes. A URL with an @ in its path alone is
// cut too; these are messages, where a password matters more.
func URL(s string) string {
	prefix, rest := "", s
	if i := strings.Index(s, "://"); i >= 0 {
		prefix, rest = s[:i+3], s[i+3:]
	}
	at := strings.LastIndexByte(rest, '@')
	if at < 0 {
		return s
	}
	return prefix + "xxxxx" + rest[at:]
}

// HasUserInfo reports whether s has user information, or may: a URL that
// does not parse and holds an @, or one whose password holds a ? or # and
// so reads as a query or fragment right after the host with an @ in it
// (http://svc:8080?SECRET@host). An @ after a / that follows the host is a
// path's, not a password's (https://registry.internal/@acme).
func HasUserInfo(s string) bool {
	u, err := url.Parse(s)
	if err != nil {
		return strings.Contains(s, "@")
	}
	if u.User != nil {
		return true
	}
	rest := s
	if i := strings.Index(s, "://"); i >= 0 {
		rest = s[i+3:]
	}
	i := strings.IndexAny(rest, "/?#")
	if i < 0 || rest[i] == '/' {
		return false
	}
	tail := rest[i:]
	if j := strings.IndexByte(tail, '/'); j >= 0 {
		tail = tail[:j]
	}
	return strings.Contains(tail, "@")
}

// URLAndQuery is URL(s) without its query and fragment, which may carry a
// key (?api_key=…): replaced by "?xxxxx".
func URLAndQuery(s string) string {
	s = URL(s)
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		return s[:i] + "?xxxxx"
	}
	return s
}
