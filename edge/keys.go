package edge

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/tollgate-dev/tollgate/schemas"
)

// KeyKind tells publishable keys (read-only scopes, safe to ship in a
// browser) from secret keys (full access, server side only).
type KeyKind string

// The two kinds of API key.
const (
	Publishable KeyKind = "publishable"
	Secret      KeyKind = "secret"
)

// Key format: "<kind>_<env>_<body><check>" where kind is pk or sk, env is
// live or test, body is 22 random base62 characters (131 bits) and check is
// 6 base62 characters of a CRC-32 over everything before it. The checksum lets
// the edge reject a mistyped or made-up key before any lookup, as GitHub's
// token format does; it is not a secret and adds no security by itself.
const (
	bodyLen     = 22
	checkLen    = 6
	prefixLen   = 8 // "sk_live_"
	secretLen   = prefixLen + bodyLen + checkLen
	displayBody = 4 // characters of the body kept for display
)

const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// ErrMalformedKey means the presented string cannot be a Tollgate key.
var ErrMalformedKey = errors.New("malformed API key")

// ParsedKey is what the edge can learn from a key string without a lookup.
type ParsedKey struct {
	Kind        KeyKind
	Environment schemas.Environment
	// Hash is the SHA-256 of the full key, the only form stored.
	Hash [32]byte
	// DisplayPrefix identifies the key to people without revealing it.
	DisplayPrefix string
}

// GenerateKey returns a new random key of the given kind and environment
// and its parsed form. The plaintext is shown once and never stored.
func GenerateKey(kind KeyKind, env schemas.Environment) (string, ParsedKey, error) {
	var p string
	switch kind {
	case Publishable:
		p = "pk_"
	case Secret:
		p = "sk_"
	default:
		return "", ParsedKey{}, fmt.Errorf("generate key: unknown kind %q", kind)
	}
	if !env.Valid() {
		return "", ParsedKey{}, fmt.Errorf("generate key: unknown environment %q", env)
	}
	p += string(env) + "_"
	body, err := random62(bodyLen)
	if err != nil {
		return "", ParsedKey{}, fmt.Errorf("generate key: %w", err)
	}
	s := p + body
	s += checksum(s)
	pk, err := ParseKey(s)
	return s, pk, err
}

// ParseKey checks the format and checksum of s and hashes it. It touches no
// storage, so malformed keys cost nothing but this call.
func ParseKey(s string) (ParsedKey, error) {
	if len(s) != secretLen {
		return ParsedKey{}, ErrMalformedKey
	}
	var pk ParsedKey
	switch s[:3] {
	case "pk_":
		pk.Kind = Publishable
	case "sk_":
		pk.Kind = Secret
	default:
		return ParsedKey{}, ErrMalformedKey
	}
	switch s[3:8] {
	case "live_":
		pk.Environment = schemas.Live
	case "test_":
		pk.Environment = schemas.Test
	default:
		return ParsedKey{}, ErrMalformedKey
	}
	for i := prefixLen; i < secretLen; i++ {
		if !isBase62(s[i]) {
			return ParsedKey{}, ErrMalformedKey
		}
	}
	want := checkDigits(s[:secretLen-checkLen])
	if subtle.ConstantTimeCompare(want[:], []byte(s[secretLen-checkLen:])) != 1 {
		return ParsedKey{}, ErrMalformedKey
	}
	var buf [secretLen]byte // as in checkDigits: no allocation
	pk.Hash = sha256.Sum256(append(buf[:0], s...))
	pk.DisplayPrefix = s[:prefixLen+displayBody]
	return pk, nil
}

// HashEqual compares two key hashes in constant time.
func HashEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }

func checksum(s string) string {
	d := checkDigits(s)
	return string(d[:])
}

// checkDigits is checksum without an allocation, for ParseKey, which runs
// on every call: a CRC-32 fits in six base62 digits (62^6 > 2^32).
func checkDigits(s string) [checkLen]byte {
	var out [checkLen]byte
	// crc32.ChecksumIEEE(s) by table, one byte at a time: the library's
	// function keeps its argument, so the conversion of s would allocate.
	n := ^uint32(0)
	for i := 0; i < len(s); i++ {
		n = crc32.IEEETable[byte(n)^s[i]] ^ n>>8
	}
	n = ^n
	for i := checkLen - 1; i >= 0; i-- {
		out[i] = base62[n%62]
		n /= 62
	}
	return out
}

func isBase62(c byte) bool {
	return '0' <= c && c <= '9' || 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z'
}

// random62 returns n base62 characters, each uniform and independent
// (log2(62) bits each: 22 carry 131 bits). Before, a key's body was one
// 128-bit number written in 22 digits, whose first digit could only be 0
// to 7, so display prefixes took an eighth of the values they show.
func random62(n int) (string, error) {
	out := make([]byte, 0, n)
	var buf [32]byte
	for len(out) < n {
		if _, err := rand.Read(buf[:]); err != nil {
			return "", err
		}
		for _, b := range buf {
			// 248 = 4 × 62: a byte below it, mod 62, is uniform.
			if b < 248 && len(out) < n {
				out = append(out, base62[b%62])
			}
		}
	}
	return string(out), nil
}
