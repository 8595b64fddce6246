// Package redact keeps secrets out of messages that quote configuration.
package redact

import (
	"net/url"
	"strings"
)

// URL is s with the user information of its authority (user:password@)
// replaced by "xxxxx", whether or not s parses as a URL: a message quoting
// a URL it refuses would otherwise print the password in it. In a URL that
// does not parse, everything before its last @ goes: a password may hold
// the /, ? or # that would otherwise end the authority before it.
func URL(s string) string {
	prefix, rest := "", s
	if i := strings.Index(s, "://"); i >= 0 {
		prefix, rest = s[:i+3], s[i+3:]
	}
	end := len(rest)
	if _, err := url.Parse(s); err == nil {
		if j := strings.IndexAny(rest, "/?#"); j >= 0 {
			end = j
		}
	}
	if at := strings.LastIndex(rest[:end], "@"); at >= 0 {
		return prefix + "xxxxx" + rest[at:]
	}
	return s
}
