package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
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
