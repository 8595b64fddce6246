// Package redact keeps secrets out of messages that quote configuration.
package redact

import "strings"

// URL is s with the user information of its authority (user:password@)
// replaced by "xxxxx", whether or not s parses as a URL: a message quoting
// a URL it refuses would otherwise print the password in it. A password
// may hold the /, ? or # that would end the authority before it, and then
// even a URL that parses reads it as its path or query
// (http://svc:8080?SECRET@host): so everything before the last @ ahead of
// the first /, ? or # after s's first @ goes. A URL with an @ in its path
// alone is cut too; these are messages, where a password matters more.
func URL(s string) string {
	prefix, rest := "", s
	if i := strings.Index(s, "://"); i >= 0 {
		prefix, rest = s[:i+3], s[i+3:]
	}
	first := strings.IndexByte(rest, '@')
	if first < 0 {
		return s
	}
	end := len(rest)
	if j := strings.IndexAny(rest[first:], "/?#"); j >= 0 {
		end = first + j
	}
	return prefix + "xxxxx" + rest[strings.LastIndexByte(rest[:end], '@'):]
}

// HasUserInfo reports whether URL would hide part of s: s has, or may be
// read as having, user information.
func HasUserInfo(s string) bool { return URL(s) != s }
