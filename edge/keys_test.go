package edge

import (
	"crypto/sha256"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// TestCheckDigitsAreCRC32InBase62 holds the key checksum to its
// definition: the CRC-32 (IEEE) of the key's first part, as six base62
// digits. checkDigits computes the CRC itself, to avoid an allocation per
// call; keys already issued must keep their checksum.
func TestCheckDigitsAreCRC32InBase62(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	want := func(s string) string {
		n := crc32.ChecksumIEEE([]byte(s))
		var out [checkLen]byte
		for i := checkLen - 1; i >= 0; i-- {
			out[i] = base62[n%62]
			n /= 62
		}
		return string(out[:])
	}
	for i := range 20_000 {
		b := make([]byte, rng.IntN(64))
		for j := range b {
			b[j] = byte(rng.IntN(256))
		}
		if i%2 == 0 {
			for j := range b {
				b[j] = base62[rng.IntN(62)]
			}
		}
		d := checkDigits(string(b))
		if got := string(d[:]); got != want(string(b)) {
			t.Fatalf("checkDigits(%q) = %q, want %q", b, got, want(string(b)))
		}
	}
	// A key made today parses, and its hash is the SHA-256 of the whole key.
	s, pk, err := GenerateKey(Secret, "live")
	if err != nil {
		t.Fatal(err)
	}
	if s[secretLen-checkLen:] != want(s[:secretLen-checkLen]) {
		t.Fatalf("key %s…: checksum is not the CRC-32 of its first part", s[:12])
	}
	if pk.Hash != sha256.Sum256([]byte(s)) {
		t.Fatal("ParseKey's hash is not the SHA-256 of the key")
	}
	// One changed character is refused before any lookup.
	bad := []byte(s)
	bad[12] = map[bool]byte{true: 'B', false: 'A'}[bad[12] == 'A']
	if _, err := ParseKey(string(bad)); err != ErrMalformedKey {
		t.Fatalf("ParseKey of a key with one character changed: %v, want ErrMalformedKey", err)
	}
}

func TestARevokedKeyIsRefusedWhateverTheRevocationsClock(t *testing.T) {
	now := time.Now()
	ahead := now.Add(time.Minute) // the revoking process's clock ran a minute ahead
	k := Key{RevokedAt: &ahead}
	if err := k.Usable(now); !errors.Is(err, ErrKeyRevoked) {
		t.Fatalf("Usable = %v, want ErrKeyRevoked", err)
	}
}

// Every character of a key's body is uniform over base62, the first one
// too: the display prefix (the first four) takes all 62⁴ values. Before,
// the body was one 128-bit number in 22 digits, whose first digit could
// only be 0 to 7. Poisson(100) per cell: a count below 50 or above 160
// happens by chance about once in 10⁸.
func TestKeyBodiesAreUniformPerCharacter(t *testing.T) {
	const keys = 62 * 100
	var counts [bodyLen][62]int
	for range keys {
		s, _, err := GenerateKey(Secret, "live")
		if err != nil {
			t.Fatal(err)
		}
		for i := range bodyLen {
			counts[i][strings.IndexByte(base62, s[prefixLen+i])]++
		}
	}
	for i := range bodyLen {
		for c, n := range counts[i] {
			if n < 50 || n > 160 {
				t.Fatalf("body character %d is %q in %d of %d keys; want about %d", i, base62[c], n, keys, keys/62)
			}
		}
	}
}
