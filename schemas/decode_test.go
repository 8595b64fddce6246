package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
	"unsafe"
)

// referenceDecode is what the decoder must agree with: encoding/json,
// refusing unknown fields and anything but white space after the value.
func referenceDecode(in []byte) (Event, bool) {
	var e Event
	dec := json.NewDecoder(bytes.NewReader(in))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return Event{}, false
	}
	for _, c := range in[dec.InputOffset():] {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return Event{}, false
		}
	}
	e.Normalize()
	return e, true
}

// stricterThanReference reports inputs the decoder refuses on purpose
// although encoding/json takes them: invalid UTF-8, a field name not
// spelled exactly, or a field or dimension key given twice.
func stricterThanReference(in []byte) bool {
	if !utf8.Valid(in) {
		return true
	}
	dec := json.NewDecoder(bytes.NewReader(in))
	type frame struct {
		object, wantKey bool
		keys            map[string]bool
	}
	var stack []*frame
	valueDone := func() {
		if len(stack) > 0 && stack[len(stack)-1].object {
			stack[len(stack)-1].wantKey = true
		}
	}
	for {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				stack = append(stack, &frame{object: true, wantKey: true, keys: map[string]bool{}})
			case '[':
				stack = append(stack, &frame{})
			default:
				stack = stack[:len(stack)-1]
				valueDone()
			}
		case string:
			if top := len(stack) - 1; top >= 0 && stack[top].object && stack[top].wantKey {
				if stack[top].keys[t] {
					return true
				}
				stack[top].keys[t] = true
				stack[top].wantKey = false
				if top == 0 && fieldIndex([]byte(t)) < 0 {
					for _, n := range fieldNames {
						if strings.EqualFold(n, t) {
							return true
						}
					}
				}
				continue
			}
			valueDone()
		default:
			valueDone()
		}
		if len(stack) == 0 {
			return false
		}
	}
}

// testInterner is shared by every check, as ingest shares one per batch.
var testInterner Interner

// checkAgainstReference fails t if the decoder and encoding/json disagree
// on in beyond the documented strictness.
func checkAgainstReference(t *testing.T, in []byte) {
	t.Helper()
	var got Event
	err := decodeEvent(in, &got, nil)
	want, ok := referenceDecode(in)
	switch {
	case err == nil && !ok:
		t.Fatalf("decoder accepted what encoding/json refuses: %q", in)
	case err == nil:
		got.Normalize()
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("decoded %q as\n%+v\nencoding/json gives\n%+v", in, got, want)
		}
		// Sharing strings across events must not change what is decoded.
		var shared Event
		if err := decodeEvent(in, &shared, &testInterner); err != nil {
			t.Fatalf("interned decode failed (%v) where the plain one did not: %q", err, in)
		}
		shared.Normalize()
		if !reflect.DeepEqual(shared, want) {
			t.Fatalf("interned decode of %q gives\n%+v\nwant\n%+v", in, shared, want)
		}
	case ok && !stricterThanReference(in):
		t.Fatalf("decoder refused what encoding/json takes (%v): %q", err, in)
	}
	checkFlat(t, in)
}

// checkFlat fails t if DecodeFlat and DecodeInterned disagree on in: the
// same event but for its dimensions, which DecodeFlat gives as the arrays
// DimensionArrays makes, and the same error.
func checkFlat(t *testing.T, in []byte) {
	t.Helper()
	want, wantErr := DecodeInterned(in, now, nil)
	var got Event
	keys, values, err := DecodeFlat(in, now, &testInterner, &got)
	if fmt.Sprint(err) != fmt.Sprint(wantErr) {
		t.Fatalf("DecodeFlat of %q: error %v, DecodeInterned's %v", in, err, wantErr)
	}
	if errors.Is(err, ErrMalformed) {
		return // the event is left partly filled, and unused
	}
	wantKeys, wantValues := want.DimensionArrays()
	if len(wantKeys) == 0 {
		wantKeys, wantValues = nil, nil
	}
	if got.Dimensions != nil || !reflect.DeepEqual(keys, wantKeys) || !reflect.DeepEqual(values, wantValues) {
		t.Fatalf("DecodeFlat of %q: dimensions %v %q %q, want %q %q", in, got.Dimensions, keys, values, wantKeys, wantValues)
	}
	want.Dimensions = nil
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DecodeFlat of %q gives\n%+v\nwant\n%+v", in, got, want)
	}
}

func TestDecoderAgreesWithEncodingJSON(t *testing.T) {
	e := validEvent()
	e.RequestID, e.ClientID, e.LatencyMicros, e.RequestBytes, e.ResponseBytes = "req_1", "c-1", 1234, 10, 20
	good, err := e.Encode()
	if err != nil {
		t.Fatal(err)
	}
	g := string(good)
	cases := []string{
		g, " \n\t" + g + " \r\n", "null", " null ", "{}", "{ }", `{"v":1}`,
		strings.Replace(g, `"account_id":"acct_123"`, `"account_id":"acct_\u0031\u00e9\ud83d\ude00\/\"\\\b\f\n\r\t"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\ud800"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\ud800\u0041"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\udc00\ud800x"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\ud83d\ude00"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\u00zz"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"\x"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, "\"route\":\"a\tb\"", 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":"ünïcödé"`, 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, "\"route\":\"bad\xffbyte\"", 1),
		strings.Replace(g, `"route":"/v1/widgets/{id}"`, `"route":null`, 1),
		strings.Replace(g, `"v":1`, `"\u0076":1`, 1),
		strings.Replace(g, `"v":1`, `"V":1`, 1),
		strings.Replace(g, `"v":1`, `"v":1,"v":1`, 1),
		strings.Replace(g, `"v":1`, `"v":-0`, 1),
		strings.Replace(g, `"v":1`, `"v":01`, 1),
		strings.Replace(g, `"v":1`, `"v":1.0`, 1),
		strings.Replace(g, `"v":1`, `"v":1e0`, 1),
		strings.Replace(g, `"v":1`, `"v":-`, 1),
		strings.Replace(g, `"v":1`, `"v":true`, 1),
		strings.Replace(g, `"v":1`, `"v":"1"`, 1),
		strings.Replace(g, `"v":1`, `"v":null`, 1),
		strings.Replace(g, `"v":1`, `"v":9223372036854775807`, 1),
		strings.Replace(g, `"v":1`, `"v":9223372036854775808`, 1),
		strings.Replace(g, `"v":1`, `"v":-9223372036854775808`, 1),
		strings.Replace(g, `"units":1`, `"units" : 7 `, 1),
		strings.Replace(g, `"units":1`, `"units":nul`, 1),
		strings.Replace(g, `"units":1`, `"units":nullx`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":"0193a0d26f1e7c3a9d2b4e5f60718293"`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":"{0193a0d2-6f1e-7c3a-9d2b-4e5f60718293}"`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":"urn:uuid:0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":"\u0030193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":""`, 1),
		strings.Replace(g, `"id":"0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"`, `"id":null`, 1),
		strings.Replace(g, `"time":"`, `"time":"x`, 1),
		strings.Replace(g, `"time":"2026-11-26T11:59:00Z"`, `"time":"2026-11-26T11:59:00.1234567+01:00"`, 1),
		strings.Replace(g, `"time":"2026-11-26T11:59:00Z"`, `"time":"2026-11-26t11:59:00z"`, 1),
		strings.Replace(g, `"time":"2026-11-26T11:59:00Z"`, `"time":"\u0032026-11-26T11:59:00Z"`, 1),
		strings.Replace(g, `"time":"2026-11-26T11:59:00Z"`, `"time":null`, 1),
		strings.Replace(g, `"time":"2026-11-26T11:59:00Z"`, `"time":1764158340`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":null`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"a":null}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"a":"1","a":"2"}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"a":1}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"a":{"b":"c"}}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":["a"]`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"\u00e9":"\n"}`, 1),
		strings.Replace(g, `"dimensions":{"model":"small","region":"eu"}`, `"dimensions":{"a":"b",}`, 1),
		strings.Replace(g, `,"units":1`, `,,"units":1`, 1),
		strings.Replace(g, `}`, `,}`, 1),
		g + "}", g + "]", g + "{}", g + "x", "[" + g + "]", `"x"`, `1`, "", " ", "{", `{"v"`, `{"v":`, `{"v":1`,
		`{"v":1,}`, `{"surprise":true}`, `{"dimensions":{}}`, "\ufeff" + g,
	}
	for _, c := range cases {
		checkAgainstReference(t, []byte(c))
	}
	// Random damage to a valid event: flipped, dropped, doubled and
	// inserted bytes, drawn from the characters JSON cares about.
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []byte("{}[]:,\"\\ u0123456789abcdefE.-+tnrlx\x00\x1f\x7f\xc3\xa9\xff")
	seeds := append([][]byte{good}, []byte(cases[7]), []byte(cases[len(cases)-2]))
	for i := 0; i < 50_000; i++ {
		in := bytes.Clone(seeds[rng.IntN(len(seeds))])
		for n := 1 + rng.IntN(3); n > 0 && len(in) > 0; n-- {
			at := rng.IntN(len(in))
			switch rng.IntN(4) {
			case 0:
				in[at] = alphabet[rng.IntN(len(alphabet))]
			case 1:
				in = append(in[:at], in[at+1:]...)
			case 2:
				in = append(in[:at], append([]byte{in[at]}, in[at:]...)...)
			case 3:
				in = append(in[:at], append([]byte{alphabet[rng.IntN(len(alphabet))]}, in[at:]...)...)
			}
		}
		checkAgainstReference(t, in)
	}
}

func TestDecoderIsStricterWhereDocumented(t *testing.T) {
	good, err := func() ([]byte, error) { e := validEvent(); return e.Encode() }()
	if err != nil {
		t.Fatal(err)
	}
	g := string(good)
	for name, in := range map[string]string{
		"field given twice":         strings.Replace(g, `"v":1`, `"v":1,"v":1`, 1),
		"field name in other case":  strings.Replace(g, `"account_id"`, `"Account_ID"`, 1),
		"dimension key given twice": strings.Replace(g, `"region":"eu"`, `"region":"eu","region":"us"`, 1),
		"invalid UTF-8":             strings.Replace(g, `"GET"`, "\"G\xffT\"", 1),
	} {
		t.Run(name, func(t *testing.T) {
			if _, ok := referenceDecode([]byte(in)); !ok {
				t.Fatalf("encoding/json refuses it too, so this does not show strictness: %q", in)
			}
			_, err := Decode([]byte(in), now)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("got %v, want a malformed-record error", err)
			}
		})
	}
}

// BenchmarkDecodeEvent measures the parser alone, without validation, on
// the typical event of BenchmarkDecodeInterned.
func BenchmarkDecodeEvent(b *testing.B) {
	raw := benchEvent(b, now)
	var in Interner
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		var e Event
		if err := decodeEvent(raw, &e, &in); err != nil {
			b.Fatal(err)
		}
	}
}

// oldStringBytes is stringBytes as it was before it learned to skip eight
// bytes at a time: one byte per step. The fast scan must agree with it on
// everything, errors included.
func oldStringBytes(s *scanner, field string) ([]byte, error) {
	if !s.consume('"') {
		return nil, s.fail(field, "want a string")
	}
	start := s.i
	ascii := true
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			raw := s.b[start:s.i]
			s.i++
			if !ascii && !utf8.Valid(raw) {
				return nil, malformed(field, "string is not valid UTF-8")
			}
			return raw, nil
		case c == '\\':
			return s.escaped(field, start)
		case c < 0x20:
			return nil, malformed(field, "control character in a string")
		case c >= utf8.RuneSelf:
			ascii = false
		}
		s.i++
	}
	return nil, malformed(field, "unterminated string")
}

// TestStringScanAgreesWithByteByByte runs random strings through both
// scanners: quotes, escapes, control characters, non-ASCII and invalid
// UTF-8 at every offset from the start of an eight-byte block, in strings
// long and short, with and without room after them for a whole block.
func TestStringScanAgreesWithByteByByte(t *testing.T) {
	pieces := []string{
		"a", "Z", "0", " ", "~", "\x7f", "/", "\"", "\\", "\\\"", "\\\\", "\\n", "\\u00e9", "\\ud83d\\ude00",
		"\\ud800", "\\x", "\\u12", "\x00", "\x1f", "\t", "é", "😀", "\u2028", "\x80", "\xc3", "\xff", "\xed\xa0\x80",
		"\xbf", "!", "#", "[", "]", "\x21", "\x5b", "\x5d", "\xa2", "\xdc",
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for n := 0; n < 200_000; n++ {
		var b []byte
		b = append(b, strings.Repeat(" ", rng.IntN(3))...)
		b = append(b, '"')
		for k := rng.IntN(24); k > 0; k-- {
			if rng.IntN(3) == 0 {
				b = append(b, pieces[rng.IntN(len(pieces))]...)
			} else {
				b = append(b, byte('a'+rng.IntN(26)))
			}
		}
		switch rng.IntN(4) {
		case 0: // the record ends inside the string
		case 1:
			b = append(b, '"')
		default:
			b = append(b, `","more":"after it"}`[:1+rng.IntN(20)]...)
		}
		start := bytes.IndexByte(b, '"')
		fast := scanner{b: b, i: start}
		slow := scanner{b: b, i: start}
		got, gotErr := fast.stringBytes("f")
		want, wantErr := oldStringBytes(&slow, "f")
		if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) || !bytes.Equal(got, want) || (wantErr == nil && fast.i != slow.i) {
			t.Fatalf("%q: got %q, %v, end %d; byte by byte %q, %v, end %d", b, got, gotErr, fast.i, want, wantErr, slow.i)
		}
	}
}

// TestStringScanEveryByte puts each byte value at each position of a
// string a little longer than two blocks, the cases a mistake in the
// eight-byte test would show in.
func TestStringScanEveryByte(t *testing.T) {
	for c := 0; c < 256; c++ {
		for at := 0; at < 20; at++ {
			for _, tail := range []string{`"`, `","x":"yyyyyyyy"}`} {
				b := []byte(`"` + strings.Repeat("a", 20) + tail)
				b[1+at] = byte(c)
				fast, slow := scanner{b: b}, scanner{b: b}
				got, gotErr := fast.stringBytes("f")
				want, wantErr := oldStringBytes(&slow, "f")
				if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) || !bytes.Equal(got, want) || (wantErr == nil && fast.i != slow.i) {
					t.Fatalf("%q: got %q, %v, end %d; byte by byte %q, %v, end %d", b, got, gotErr, fast.i, want, wantErr, slow.i)
				}
			}
		}
	}
}

// TestDecoderStringsAgreeWithEncodingJSON sends the same kind of random
// strings through the whole decoder, as a value and as a dimension key,
// against encoding/json.
func TestDecoderStringsAgreeWithEncodingJSON(t *testing.T) {
	pieces := []string{
		"a", "/", "\\\"", "\\\\", "\\/", "\\n", "\\t", "\\u00e9", "\\u0000", "\\ud83d\\ude00", "\\ud800", "\\udc00x",
		"\\x", "\\u12", "\x00", "\x1f", "\t", "\n", "\x7f", "é", "😀", "\u2028", "\x80", "\xc3", "\xff", "\xed\xa0\x80",
		"\xf4\x90\x80\x80", "\"",
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for n := 0; n < 20_000; n++ {
		var v []byte
		for k := rng.IntN(20); k > 0; k-- {
			if rng.IntN(3) == 0 {
				v = append(v, pieces[rng.IntN(len(pieces))]...)
			} else {
				v = append(v, byte('a'+rng.IntN(26)))
			}
		}
		checkAgainstReference(t, []byte(`{"route":"`+string(v)+`","units":1}`))
		checkAgainstReference(t, []byte(`{"dimensions":{"`+string(v)+`":"x"},"type":"`+string(v)+`"}`))
	}
}

// TestIntegerAgreesWithParseInt checks the digit loop against
// strconv.ParseInt, which it replaced, around the edges of the range.
func TestIntegerAgreesWithParseInt(t *testing.T) {
	cases := []string{
		"0", "-0", "1", "-1", "9", "10", "123456789", "-123456789",
		"922337203685477580", "9223372036854775806", "9223372036854775807", "9223372036854775808",
		"9223372036854775809", "9999999999999999999", "10000000000000000000", "18446744073709551615",
		"18446744073709551616", "99999999999999999999", "123456789012345678901234567890",
		"-9223372036854775807", "-9223372036854775808", "-9223372036854775809", "-9999999999999999999",
		"-10000000000000000000", "-18446744073709551616",
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for n := 0; n < 10_000; n++ {
		d := []byte{byte('1' + rng.IntN(9))}
		for k := rng.IntN(21); k > 0; k-- {
			d = append(d, byte('0'+rng.IntN(10)))
		}
		if rng.IntN(2) == 0 {
			d = append([]byte{'-'}, d...)
		}
		cases = append(cases, string(d))
	}
	for _, c := range cases {
		s := scanner{b: []byte(c + ",")}
		got, err := s.integer("n")
		want, werr := strconv.ParseInt(c, 10, 64)
		if (err == nil) != (werr == nil) || err == nil && got != want {
			t.Fatalf("%s: got %d, %v; ParseInt gives %d, %v", c, got, err, want, werr)
		}
		if err != nil && err.Error() != `malformed event: field "n": number out of range` {
			t.Fatalf("%s: error %q", c, err)
		}
		if err == nil && s.i != len(c) {
			t.Fatalf("%s: stopped at %d", c, s.i)
		}
	}
}

// TestInternerReturnsEqualStrings checks that the cache in front of the
// map never returns anything but the bytes asked for, whatever shares a
// slot, and that every repeat shares one copy.
func TestInternerReturnsEqualStrings(t *testing.T) {
	var in Interner
	rng := rand.New(rand.NewPCG(9, 10))
	first := map[string]string{}
	for n := 0; n < 3*maxInterned; n++ {
		// Few distinct lengths and end bytes, so that slots collide.
		b := []byte{byte('a' + rng.IntN(3))}
		for k := rng.IntN(3); k > 0; k-- {
			b = append(b, byte('a'+rng.IntN(26)))
		}
		b = append(b, byte('a'+rng.IntN(3)))
		got := in.intern(b)
		if got != string(b) {
			t.Fatalf("interned %q as %q", b, got)
		}
		if f, ok := first[got]; ok && unsafe.StringData(f) != unsafe.StringData(got) {
			t.Fatalf("%q: two copies", got)
		}
		first[got] = got
	}
	if got := in.intern(nil); got != "" {
		t.Fatalf("empty value interned as %q", got)
	}
	var nilIn *Interner
	if got := nilIn.intern([]byte("x")); got != "x" {
		t.Fatalf("nil interner gives %q", got)
	}
}

// TestInternerStartsOver checks the bound: past maxInterned values the
// map and the cache in front of it start over.
func TestInternerStartsOver(t *testing.T) {
	var in Interner
	keep := in.intern([]byte("keep"))
	for n := 0; len(in.m) < maxInterned; n++ {
		in.intern([]byte(strconv.Itoa(n)))
	}
	in.intern([]byte("one more"))
	if len(in.m) != 1 {
		t.Fatalf("%d values after starting over, want 1", len(in.m))
	}
	for _, r := range in.recent {
		if r != "" && r != "one more" {
			t.Fatalf("cache still holds %q after starting over", r)
		}
	}
	if again := in.intern([]byte("keep")); again != keep {
		t.Fatalf("got %q", again)
	}
}

// TestValidateListsDimensionProblemsInKeyOrder pins the order Validate
// reports bad dimensions in, now that it sorts the keys only when one is
// bad, and the methods it knows.
func TestValidateListsDimensionProblemsInKeyOrder(t *testing.T) {
	e := validEvent()
	e.Dimensions = map[string]string{"ok": "x", "z Bad": "x", "a": strings.Repeat("v", MaxDimensionValue+1),
		"m": "y", "B": "x", strings.Repeat("k", MaxDimensionKey+1): "x", "fine_2": strings.Repeat("v", MaxDimensionValue)}
	var ve *ValidationError
	if !errors.As(e.Validate(now), &ve) {
		t.Fatal("want a *ValidationError")
	}
	var got []string
	for _, p := range ve.Problems {
		got = append(got, p.Error())
	}
	want := []string{
		"dimensions.B: key must be lower case letters, digits and _, at most 64 bytes",
		"dimensions.a: value longer than 256 bytes",
		"dimensions." + strings.Repeat("k", MaxDimensionKey+1) + ": key must be lower case letters, digits and _, at most 64 bytes",
		"dimensions.z Bad: key must be lower case letters, digits and _, at most 64 bytes",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%q\nwant\n%q", got, want)
	}
	for _, m := range []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "CONNECT", "TRACE", "GETS", "GE"} {
		e := validEvent()
		e.Method = m
		known := m == strings.ToUpper(m) && len(m) > 2 && m != "CONNECT" && m != "TRACE" && m != "GETS"
		if err := e.Validate(now); (err == nil) != known {
			t.Errorf("method %q: %v", m, err)
		}
	}
}

// TestDecodeFlatAgreesWithDecode covers what DecodeFlat does differently:
// sorting keys given out of order, finding a key given twice before and
// after MaxDimensions, and listing the same validation problems.
func TestDecodeFlatAgreesWithDecode(t *testing.T) {
	dims := func(n int, dupAt int) string {
		var b strings.Builder
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			k := fmt.Sprintf("k%03d", n-i) // descending: every key out of order
			if i == dupAt {
				k = fmt.Sprintf("k%03d", n) // the first key again
			}
			fmt.Fprintf(&b, "%q:%q", k, fmt.Sprint("v", i))
		}
		return b.String()
	}
	e := validEvent()
	e.Dimensions = nil
	base, err := e.Encode()
	if err != nil {
		t.Fatal(err)
	}
	with := func(obj string) []byte {
		return []byte(strings.TrimSuffix(string(base), "}") + `,"dimensions":{` + obj + `}}`)
	}
	inputs := [][]byte{
		with(dims(1, -1)), with(dims(3, -1)), with(dims(MaxDimensions, -1)), with(dims(MaxDimensions+1, -1)),
		with(dims(100, -1)), with(dims(5, 3)), with(dims(MaxDimensions, MaxDimensions-1)),
		with(dims(MaxDimensions+1, MaxDimensions)), with(dims(100, 60)),
		with(`"z Bad":"x","ok":"x","a":"` + strings.Repeat("v", MaxDimensionValue+1) + `","B":"x","m":null`),
	}
	for _, in := range inputs {
		checkFlat(t, in)
	}
	// The cases must reach every branch: an accepted event, a key given
	// twice, and a validation error.
	var accepted, twice, invalid bool
	for _, in := range inputs {
		_, _, err := DecodeFlat(in, now, nil, new(Event))
		var ve *ValidationError
		switch {
		case err == nil:
			accepted = true
		case strings.Contains(err.Error(), "given twice"):
			twice = true
		case errors.As(err, &ve):
			invalid = true
		}
	}
	if !accepted || !twice || !invalid {
		t.Fatalf("accepted %v, key twice %v, invalid %v: want all three", accepted, twice, invalid)
	}
}

// BenchmarkDecodeFlat is BenchmarkDecodeInterned's event through DecodeFlat.
func BenchmarkDecodeFlat(b *testing.B) {
	raw := benchEvent(b, now)
	var in Interner
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		var e Event
		if _, _, err := DecodeFlat(raw, now, &in, &e); err != nil {
			b.Fatal(err)
		}
	}
}
