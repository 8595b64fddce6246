package schemas

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"unicode/utf16"
	"unicode/utf8"
)

// decodeEvent parses the wire form of an event into e. It is written for
// this one shape because ingest decodes every record it reads and a
// general-purpose decoder spends most of its time on reflection and on
// allocations the event does not need. What it accepts is the strict
// subset of what encoding/json would decode into Event (see
// TestDecoderAgreesWithEncodingJSON):
//
//   - the value is one object (or null) with nothing but white space after it;
//   - every field name is one of Event's JSON names, spelled exactly, at most
//     once (encoding/json would also match other letter cases and let the
//     last copy win);
//   - strings are valid UTF-8 (encoding/json would replace bad bytes with
//     U+FFFD, changing the event the producer sent);
//   - integers are written without a fraction or exponent and fit their field;
//   - "time" is an RFC 3339 string, "id" a UUID, "dimensions" an object of
//     strings; null leaves a field at its zero value.
//
// Errors wrap ErrMalformed and name the field.
func decodeEvent(b []byte, e *Event, in *Interner) error {
	s := scanner{b: b, in: in}
	return s.event(e)
}

// decodeFlat is decodeEvent leaving e.Dimensions nil: the dimensions come
// back as key, value pairs in the order the record gives them.
func decodeFlat(b []byte, e *Event, in *Interner, pairs []string) ([]string, error) {
	s := scanner{b: b, in: in, flat: true, pairs: pairs}
	err := s.event(e)
	return s.pairs, err
}

func (s *scanner) event(e *Event) error {
	s.space()
	if s.literal("null") {
		return s.end()
	}
	if !s.consume('{') {
		return s.fail("", "want a JSON object")
	}
	var seen uint32
	s.space()
	if s.consume('}') {
		return s.end()
	}
	for {
		s.space()
		name, err := s.stringBytes("") // in place unless escaped
		if err != nil {
			return err
		}
		f := fieldIndex(name)
		if f < 0 {
			return malformed(string(name), "unknown field")
		}
		if seen&(1<<f) != 0 {
			return malformed(string(name), "field given twice")
		}
		seen |= 1 << f
		s.space()
		if !s.consume(':') {
			return s.fail(string(name), "want ':' after the field name")
		}
		s.space()
		if err := s.field(f, e); err != nil {
			return err
		}
		s.space()
		if s.consume(',') {
			continue
		}
		if s.consume('}') {
			return s.end()
		}
		return s.fail(string(name), "want ',' or '}' after the value")
	}
}

// The fields, in the order of fieldNames.
const (
	fVersion = iota
	fID
	fAccount
	fEnv
	fKey
	fType
	fTime
	fRoute
	fMethod
	fStatus
	fLatency
	fReqBytes
	fRespBytes
	fUnits
	fRequestID
	fClientID
	fDimensions
)

var fieldNames = [...]string{"v", "id", "account_id", "env", "key_id", "type", "time", "route", "method",
	"status", "latency_us", "request_bytes", "response_bytes", "units", "request_id", "client_id", "dimensions"}

func fieldIndex(name []byte) int {
	// A switch on string(name) compiles to a comparison without a copy.
	switch string(name) {
	case "v":
		return fVersion
	case "id":
		return fID
	case "account_id":
		return fAccount
	case "env":
		return fEnv
	case "key_id":
		return fKey
	case "type":
		return fType
	case "time":
		return fTime
	case "route":
		return fRoute
	case "method":
		return fMethod
	case "status":
		return fStatus
	case "latency_us":
		return fLatency
	case "request_bytes":
		return fReqBytes
	case "response_bytes":
		return fRespBytes
	case "units":
		return fUnits
	case "request_id":
		return fRequestID
	case "client_id":
		return fClientID
	case "dimensions":
		return fDimensions
	}
	return -1
}

func (s *scanner) field(f int, e *Event) error {
	name := fieldNames[f]
	if s.literal("null") {
		return nil
	}
	var err error
	switch f {
	case fVersion:
		var n int64
		n, err = s.integer(name)
		e.Version = int(n)
	case fStatus:
		var n int64
		n, err = s.integer(name)
		e.Status = int(n)
	case fLatency:
		e.LatencyMicros, err = s.integer(name)
	case fReqBytes:
		e.RequestBytes, err = s.integer(name)
	case fRespBytes:
		e.ResponseBytes, err = s.integer(name)
	case fUnits:
		e.Units, err = s.integer(name)
	case fID:
		var raw []byte
		if raw, err = s.stringBytes(name); err == nil {
			if perr := e.ID.UnmarshalText(raw); perr != nil {
				err = malformed(name, perr.Error())
			}
		}
	case fTime:
		start := s.i
		if _, err = s.stringBytes(name); err == nil {
			// The quoted literal, as encoding/json hands it to
			// time.Time: strict RFC 3339, no escapes.
			if perr := e.Time.UnmarshalJSON(s.b[start:s.i]); perr != nil {
				err = malformed(name, perr.Error())
			}
		}
	case fDimensions:
		err = s.dimensions(e)
	default:
		var v string
		if f == fRequestID || f == fClientID {
			v, err = s.str(name) // unique per event: not worth a lookup
		} else {
			v, err = s.shared(name)
		}
		switch f {
		case fAccount:
			e.AccountID = v
		case fEnv:
			e.Environment = Environment(v)
		case fKey:
			e.KeyID = v
		case fType:
			e.Type = v
		case fRoute:
			e.Route = v
		case fMethod:
			e.Method = v
		case fRequestID:
			e.RequestID = v
		case fClientID:
			e.ClientID = v
		}
	}
	return err
}

func (s *scanner) dimensions(e *Event) error {
	const name = "dimensions"
	if !s.consume('{') {
		return s.fail(name, "want an object of strings")
	}
	if !s.flat {
		e.Dimensions = map[string]string{}
	}
	// In flat form, a key given twice is found by comparing it with the
	// keys before it, and past MaxDimensions (an event that fails
	// validation anyway) through a map, so that a record of thousands of
	// keys costs no more than the map would.
	var many map[string]struct{}
	s.space()
	if s.consume('}') {
		return nil
	}
	for {
		s.space()
		k, err := s.shared(name)
		if err != nil {
			return err
		}
		if s.dimensionSeen(e, k, &many) {
			return malformed(name, fmt.Sprintf("key %q given twice", ClipName(k)))
		}
		s.space()
		if !s.consume(':') {
			return s.fail(name, "want ':' after a dimension key")
		}
		s.space()
		var v string
		if !s.literal("null") {
			if v, err = s.shared(name); err != nil {
				return err
			}
		}
		if s.flat {
			s.pairs = append(s.pairs, k, v)
		} else {
			e.Dimensions[k] = v
		}
		s.space()
		if s.consume(',') {
			continue
		}
		if s.consume('}') {
			return nil
		}
		return s.fail(name, "want ',' or '}' after a dimension value")
	}
}

// dimensionSeen reports whether the dimension key k came before.
func (s *scanner) dimensionSeen(e *Event, k string, many *map[string]struct{}) bool {
	if !s.flat {
		_, dup := e.Dimensions[k]
		return dup
	}
	n := len(s.pairs) / 2
	if n < MaxDimensions {
		for i := 0; i < len(s.pairs); i += 2 {
			if s.pairs[i] == k {
				return true
			}
		}
		return false
	}
	if *many == nil {
		*many = make(map[string]struct{}, 2*n)
		for i := 0; i < len(s.pairs); i += 2 {
			(*many)[s.pairs[i]] = struct{}{}
		}
	}
	if _, dup := (*many)[k]; dup {
		return true
	}
	(*many)[k] = struct{}{}
	return false
}

func malformed(field, reason string) error {
	field = ClipName(field) // a field name may come from the input
	if field == "" {
		return fmt.Errorf("%w: %s", ErrMalformed, reason)
	}
	return fmt.Errorf("%w: field %q: %s", ErrMalformed, field, reason)
}

// scanner walks a JSON text. It never copies the input except to build
// the strings it returns.
type scanner struct {
	b  []byte
	i  int
	in *Interner
	// flat puts dimensions in pairs (key, value, key, value, …) instead of
	// a map.
	flat  bool
	pairs []string
}

func (s *scanner) fail(field, want string) error {
	if s.i >= len(s.b) {
		return malformed(field, want+", got the end of the record")
	}
	return malformed(field, fmt.Sprintf("%s, got %q at byte %d", want, s.b[s.i], s.i))
}

func (s *scanner) space() {
	// Producers write compact JSON, so this is called dozens of times per
	// record to find no space at all: one comparison settles that, as
	// every white-space byte is at most ' '.
	for s.i < len(s.b) && s.b[s.i] <= ' ' {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) consume(c byte) bool {
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// literal consumes lit if it is next and is not followed by more of a word.
func (s *scanner) literal(lit string) bool {
	if len(s.b)-s.i < len(lit) || string(s.b[s.i:s.i+len(lit)]) != lit {
		return false
	}
	s.i += len(lit)
	return true
}

// end checks that only white space is left.
func (s *scanner) end() error {
	s.space()
	if s.i != len(s.b) {
		return malformed("", fmt.Sprintf("trailing data after the event at byte %d", s.i))
	}
	return nil
}

// str reads a string value.
func (s *scanner) str(field string) (string, error) {
	raw, err := s.stringBytes(field)
	if err != nil {
		return "", err
	}
	return string(raw), nil
}

// shared reads a string value that many events repeat (account, key,
// route, dimension), returning one copy for all of them when interning.
func (s *scanner) shared(field string) (string, error) {
	raw, err := s.stringBytes(field)
	if err != nil {
		return "", err
	}
	return s.in.intern(raw), nil
}

// stringBytes reads a JSON string and returns its contents: a slice of the
// input when it has no escapes, else a fresh unescaped copy.
func (s *scanner) stringBytes(field string) ([]byte, error) {
	if !s.consume('"') {
		return nil, s.fail(field, "want a string")
	}
	// Work on locals: the compiler cannot keep s.i in a register, so
	// advancing it byte by byte would store to memory on every byte.
	b, start := s.b, s.i
	i := start
	// Non-ASCII bytes stop the scan only until the first one is seen: from
	// then on the whole string is checked at the end anyway.
	high := uint64(highBits)
	for {
		// Almost every byte of a record's strings needs nothing, so look
		// at eight at a time and jump straight to the first that does.
		if i+8 <= len(b) {
			x := binary.LittleEndian.Uint64(b[i:])
			m := stopBytes(x) | x&high
			if m == 0 {
				i += 8
				continue
			}
			i += bits.TrailingZeros64(m) / 8
		} else {
			for i < len(b) && !strStop[b[i]] { // the last few bytes of the record
				i++
			}
			if i >= len(b) {
				s.i = i
				return nil, malformed(field, "unterminated string")
			}
		}
		switch c := b[i]; {
		case c == '"':
			raw := b[start:i]
			s.i = i + 1
			if high == 0 && !utf8.Valid(raw) {
				return nil, malformed(field, "string is not valid UTF-8")
			}
			return raw, nil
		case c == '\\':
			s.i = i
			return s.escaped(field, start)
		case c < 0x20:
			s.i = i
			return nil, malformed(field, "control character in a string")
		default: // c >= utf8.RuneSelf
			high = 0
			i++
		}
	}
}

// strStop marks the bytes at which the string scan must stop and look: the
// closing quote, a backslash, a control character (which JSON does not
// allow in a string) and the bytes of multi-byte UTF-8 sequences (which
// make the string need a validity check).
var strStop = func() (t [256]bool) {
	for c := range t {
		t[c] = c == '"' || c == '\\' || c < 0x20 || c >= utf8.RuneSelf
	}
	return t
}()

const (
	lowBits  = 0x0101010101010101 // 0x01 in every byte of a uint64
	highBits = 0x8080808080808080 // 0x80 in every byte
)

// stopBytes looks at x, eight bytes of a string in memory order, for the
// ASCII bytes strStop marks: '"', '\\' and control characters. It returns 0
// if there are none, else a word whose lowest set bit is the high bit of
// the first of them. (Non-ASCII bytes, the rest of strStop, are x&highBits.)
//
// It uses the bit tricks that find a zero byte, (v-lowBits)&^v with
// v = x^c for each c looked for, and a byte below n, (x-n*lowBits)&^x.
// Each flags every byte that matches and may flag a byte above a match,
// because the subtraction borrows from it, but never one below the first
// match, which is all the caller uses. Bytes of 0x80 and above are never
// flagged: their high bit is set in x and in x^c, and &^ clears it.
func stopBytes(x uint64) uint64 {
	q := x ^ '"'*lowBits
	bs := x ^ '\\'*lowBits
	return ((q-lowBits)&^q | (bs-lowBits)&^bs | (x-0x20*lowBits)&^x) & highBits
}

// escaped finishes a string that has an escape, from its start.
func (s *scanner) escaped(field string, start int) ([]byte, error) {
	out := make([]byte, 0, s.i-start+16)
	out = append(out, s.b[start:s.i]...)
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			s.i++
			if !utf8.Valid(out) {
				return nil, malformed(field, "string is not valid UTF-8")
			}
			return out, nil
		case c < 0x20:
			return nil, malformed(field, "control character in a string")
		case c != '\\':
			out = append(out, c)
			s.i++
			continue
		}
		if s.i+1 >= len(s.b) {
			break
		}
		esc := s.b[s.i+1]
		s.i += 2
		switch esc {
		case '"', '\\', '/':
			out = append(out, esc)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := s.hex4()
			if !ok {
				return nil, malformed(field, `bad \u escape`)
			}
			if utf16.IsSurrogate(r) {
				// A surrogate must be followed by its other half; one that
				// is not becomes U+FFFD, as encoding/json does, and the
				// escape after it is read on its own.
				paired := false
				if s.i+1 < len(s.b) && s.b[s.i] == '\\' && s.b[s.i+1] == 'u' {
					save := s.i
					s.i += 2
					r2, ok2 := s.hex4()
					if !ok2 {
						return nil, malformed(field, `bad \u escape`)
					}
					if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
						r, paired = d, true
					} else {
						s.i = save
					}
				}
				if !paired {
					r = utf8.RuneError
				}
			}
			out = utf8.AppendRune(out, r)
		default:
			return nil, malformed(field, fmt.Sprintf("bad escape \\%c", esc))
		}
	}
	return nil, malformed(field, "unterminated string")
}

func (s *scanner) hex4() (rune, bool) {
	if len(s.b)-s.i < 4 {
		return 0, false
	}
	var r rune
	for _, c := range s.b[s.i : s.i+4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	s.i += 4
	return r, true
}

// integer reads a JSON number that must be a whole number in int64 range.
func (s *scanner) integer(field string) (int64, error) {
	neg := s.consume('-')
	b, start := s.b, s.i
	i := start
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		if i < len(b) && b[i] == '"' {
			return 0, malformed(field, "want a number, got a string")
		}
		return 0, s.fail(field, "want a number")
	}
	s.i = i
	if i < len(b) {
		switch b[i] {
		case '.', 'e', 'E':
			return 0, malformed(field, "want an integer (no fraction or exponent)")
		}
	}
	// Accumulate the digits here rather than in strconv.ParseInt, which
	// would check again the syntax checked above. Nineteen digits cannot
	// overflow a uint64, and more are out of range for an int64 anyway.
	digits := b[start:i]
	if len(digits) > 19 {
		return 0, malformed(field, "number out of range")
	}
	var n uint64
	for _, c := range digits {
		n = n*10 + uint64(c-'0')
	}
	if neg {
		if n > 1<<63 {
			return 0, malformed(field, "number out of range")
		}
		return -int64(n), nil // for 1<<63, int64(n) and its negation are both MinInt64
	}
	if n > math.MaxInt64 {
		return 0, malformed(field, "number out of range")
	}
	return int64(n), nil
}

// Interner hands out one copy of each string value it has seen, so that a
// batch of events from a few accounts, keys and routes does not allocate
// those strings once per event. It is bounded: past maxInterned values it
// starts over. The zero value is ready; a nil *Interner copies every time.
// Not safe for concurrent use.
type Interner struct {
	m map[string]string
	// recent holds the value last returned for each of a few slots picked
	// by a cheap hash of the bytes (recentSlot). The values a batch
	// repeats in nearly every event are then found with one comparison,
	// where the map would first hash every byte; a miss costs that
	// comparison on top of the map lookup.
	recent [64]string
	// pairs is DecodeFlat's scratch space for one event's dimensions.
	pairs []string
}

const maxInterned = 4096

func (in *Interner) intern(b []byte) string {
	if in == nil {
		return string(b)
	}
	if len(b) == 0 {
		return ""
	}
	slot := &in.recent[recentSlot(b)]
	if *slot == string(b) {
		return *slot
	}
	s, ok := in.m[string(b)]
	if !ok {
		if in.m == nil || len(in.m) >= maxInterned {
			in.m = make(map[string]string, 256)
			clear(in.recent[:]) // so that recent, too, holds only values of the new map
		}
		s = string(b)
		in.m[s] = s
	}
	*slot = s
	return s
}

// recentSlot picks b's slot in Interner.recent from its length and its
// first and last bytes, which tell apart most of the values one batch
// repeats, mixed by a Fibonacci multiplier so that they spread over the
// slots. b must not be empty.
func recentSlot(b []byte) int {
	x := uint32(len(b)) | uint32(b[0])<<8 | uint32(b[len(b)-1])<<16
	return int(x * 0x9E3779B1 >> (32 - 6))
}
