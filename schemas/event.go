// Package schemas is Tollgate's contract between components: the versioned
// usage event, the ClickHouse DDL and the Postgres migrations.
//
// A usage event is immutable once the edge has assigned its id. Every field
// that ClickHouse uses to deduplicate (see clickhouse/raw_events.sql) is fixed
// at that moment, so two deliveries of one event are byte-for-byte the same row.
package schemas

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// EventVersion is the schema version this package writes. Readers accept
// exactly the versions they know; anything else is a dead letter.
const EventVersion = 1

// Limits on a single event. They keep one bad producer from filling
// ClickHouse with unbounded strings and are part of the contract.
const (
	MaxIDLength        = 64
	MaxTypeLength      = 64
	MaxRouteLength     = 256
	MaxDimensions      = 16
	MaxDimensionKey    = 64
	MaxDimensionValue  = 256
	MaxClientIDLength  = 128
	MaxRequestIDLength = 128
	// MaxUnits bounds one event's units: a trillion. Sums are Int64, so
	// without a bound two events could wrap a total negative, or to any
	// value at all.
	MaxUnits = 1_000_000_000_000
	// MaxMeasure bounds latency_us, request_bytes and response_bytes, which
	// meters can SUM: 10^15 (a petabyte, or 31 years), far beyond any call
	// the edge measures, so a single corrupt record cannot wrap a sum.
	MaxMeasure = 1_000_000_000_000_000
	// MaxClockSkew bounds how far in the future an event may be stamped.
	MaxClockSkew = 5 * time.Minute
)

// Environment separates live traffic, which is billed, from test-mode
// traffic, which is metered but never billed.
type Environment string

// The two environments of every account.
const (
	Live Environment = "live"
	Test Environment = "test"
)

// Valid reports whether e is one of the known environments.
func (e Environment) Valid() bool { return e == Live || e == Test }

// Event is one usage event, version 1. JSON is its wire encoding on Kafka.
type Event struct {
	Version     int         `json:"v"`
	ID          uuid.UUID   `json:"id"`
	AccountID   string      `json:"account_id"`
	Environment Environment `json:"env"`
	KeyID       string      `json:"key_id"`
	// Type is the event type that meters select on, e.g. "api_call".
	Type string `json:"type"`
	// Time is when the call happened, UTC, microsecond precision.
	Time   time.Time `json:"time"`
	Route  string    `json:"route,omitempty"`
	Method string    `json:"method,omitempty"`
	Status int       `json:"status,omitempty"`
	// LatencyMicros runs from the call's arrival at the edge (Time) to the
	// end of its answer, admission included.
	LatencyMicros int64 `json:"latency_us,omitempty"`
	RequestBytes  int64 `json:"request_bytes,omitempty"`
	ResponseBytes int64 `json:"response_bytes,omitempty"`
	// Units is the integer quantity this event contributes (1 for a call).
	Units     int64  `json:"units"`
	RequestID string `json:"request_id,omitempty"`
	// ClientID is the producer's own id for server-reported events; the
	// edge derives ID from it so a client retry is the same event.
	ClientID   string            `json:"client_id,omitempty"`
	Dimensions map[string]string `json:"dimensions,omitempty"`
}

// FieldError says which field of an event is wrong and why. Its Field uses
// the JSON name so API clients can point at their own payload; its Code is
// one of the Problem constants, for a program to act on, and its Reason the
// words for a person.
type FieldError struct {
	Field  string `json:"field"`
	Code   string `json:"code"`
	Reason string `json:"reason"`
}

// What a FieldError's Code says is wrong. The set only grows: a client may
// switch on these, and a code once given keeps its meaning.
const (
	ProblemRequired           = "required"            // missing, or empty
	ProblemUnsupportedVersion = "unsupported_version" // a schema version this build does not read
	ProblemTooLong            = "too_long"            // more bytes than the field may have
	ProblemInvalidCharacters  = "invalid_characters"  // a character the field may not hold
	ProblemInvalidText        = "invalid_text"        // not valid UTF-8, or a lone UTF-16 surrogate escape
	ProblemInvalidValue       = "invalid_value"       // not one of the values the field takes
	ProblemOutOfRange         = "out_of_range"        // a number or time outside the field's bounds
	ProblemInFuture           = "in_future"           // a time further ahead than the clock skew allowed
	ProblemTooOld             = "too_old"             // a time too far back to be counted
	ProblemTooMany            = "too_many"            // more entries than the field may have
	ProblemWrongType          = "wrong_type"          // another JSON type than the field's
	ProblemInvalidTime        = "invalid_time"        // not an RFC 3339 time with a zone
	ProblemUnknownField       = "unknown_field"       // a field the object does not have (names are case-sensitive)
	ProblemDuplicateField     = "duplicate_field"     // a field or key given twice
	ProblemNull               = "null"                // null where a value or nothing is wanted
	ProblemMalformed          = "malformed"           // not a JSON object of the expected shape
	ProblemUnknownEventType   = "unknown_event_type"  // a warning: no meter counts the event's type
)

func (e FieldError) Error() string { return e.Field + ": " + e.Reason }

// MaxProblems bounds the problems a ValidationError lists. An event with
// thousands of bad dimension keys would otherwise give a reason many times
// its own size, too large for the dead-letter topic or an API answer; the
// last one listed says how many more there are.
const MaxProblems = 20

// maxQuoted bounds the bytes of a field name or dimension key taken from
// the input into a problem: a name longer than any valid one is wrong
// whatever it says after that.
const maxQuoted = 80

// ClipName is a field name or dimension key from the input as a problem
// quotes it: cut to 80 bytes.
func ClipName(s string) string { return Clip(s, maxQuoted) }

// BoundProblems keeps the first MaxProblems of ps, and one more saying
// how many there are past it.
func BoundProblems(ps []FieldError) []FieldError {
	if len(ps) <= MaxProblems+1 {
		return ps
	}
	more := ps[MaxProblems]
	more.Reason += fmt.Sprintf(" (and %d more problems, not listed)", len(ps)-MaxProblems-1)
	return append(ps[:MaxProblems], more)
}

// Clip returns s cut to at most max bytes at a character boundary, with
// "…" in place of what was cut, so a message quoting its input stays small.
func Clip(s string, max int) string {
	if len(s) <= max {
		return s
	}
	const ellipsis = "…"
	n := max - len(ellipsis)
	if n < 0 {
		n = 0
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + ellipsis
}

// ValidationError collects every problem with one event.
type ValidationError struct {
	Problems []FieldError `json:"problems"`
}

func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		parts[i] = p.Error()
	}
	return "invalid event: " + strings.Join(parts, "; ")
}

// ErrMalformed wraps decoding failures: the bytes are not a version-1 event.
var ErrMalformed = errors.New("malformed event")

const (
	asciiLower  = "abcdefghijklmnopqrstuvwxyz"
	asciiUpper  = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	asciiDigits = "0123456789"
)

var (
	// identifiers: ^[A-Za-z0-9_.:-]+$
	identChars = newCharset(asciiLower+asciiUpper+asciiDigits+"_.:-", false)
	// event types: ^[a-z][a-z0-9_.]*$
	typeChars = newCharset(asciiLower+asciiDigits+"_.", true)
	// dimension keys: ^[a-z][a-z0-9_]*$
	dimKeyChars = newCharset(asciiLower+asciiDigits+"_", true)
)

// knownMethod reports whether m is an HTTP method an event may carry. A
// switch rather than a map: it compares a few bytes where a map would
// hash the string first, on every event.
func knownMethod(m string) bool {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS":
		return true
	}
	return false
}

// ValidIdent reports whether s may be an account or key id: 1 to 64 bytes
// of letters, digits and _ . : -.
func ValidIdent(s string) bool {
	return s != "" && len(s) <= MaxIDLength && identChars.MatchString(s)
}

// hasControl reports whether s holds an ASCII control character.
func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}

// TypeProblem says what is wrong with t as an event type, or "" when it
// is a valid one: the rule every event, meter and edge.event_type keeps.
func TypeProblem(t string) string {
	_, reason := typeProblem(t)
	return reason
}

// typeProblem is TypeProblem with the problem's code.
func typeProblem(t string) (code, reason string) {
	switch {
	case t == "":
		return ProblemRequired, "required"
	case len(t) > MaxTypeLength:
		return ProblemTooLong, fmt.Sprintf("longer than %d bytes", MaxTypeLength)
	case !typeChars.MatchString(t):
		return ProblemInvalidCharacters, "must be lower case letters, digits, _ and ., starting with a letter"
	}
	return "", ""
}

// Validate checks every field against the contract, relative to now, and
// returns a *ValidationError listing its problems (BoundProblems), or nil.
func (e *Event) Validate(now time.Time) error {
	return e.validate(now, nil, nil)
}

// Problems lists every problem Validate finds, unbounded, for a caller
// that adds problems of its own before it bounds the list.
func (e *Event) Problems(now time.Time) []FieldError {
	return e.problems(now, nil, nil)
}

// validate is Validate with the dimensions given as key-sorted arrays
// (keys, values) when e.Dimensions is nil.
func (e *Event) validate(now time.Time, keys, values []string) error {
	if ps := BoundProblems(e.problems(now, keys, values)); len(ps) > 0 {
		return &ValidationError{Problems: ps}
	}
	return nil
}

// problems is Problems with the dimensions as validate takes them.
func (e *Event) problems(now time.Time, keys, values []string) []FieldError {
	var ps []FieldError
	add := func(field, code, reason string, args ...any) {
		ps = append(ps, FieldError{Field: field, Code: code, Reason: fmt.Sprintf(reason, args...)})
	}
	if e.Version != EventVersion {
		add("v", ProblemUnsupportedVersion, "unsupported schema version %d (want %d)", e.Version, EventVersion)
	}
	if e.ID == uuid.Nil {
		add("id", ProblemRequired, "required")
	}
	checkIdent := func(field, v string) {
		switch {
		case v == "":
			add(field, ProblemRequired, "required")
		case len(v) > MaxIDLength:
			add(field, ProblemTooLong, "longer than %d bytes", MaxIDLength)
		case !identChars.MatchString(v):
			add(field, ProblemInvalidCharacters, "may contain only letters, digits and _ . : -")
		}
	}
	checkIdent("account_id", e.AccountID)
	checkIdent("key_id", e.KeyID)
	if !e.Environment.Valid() {
		add("env", ProblemInvalidValue, "must be %q or %q", Live, Test)
	}
	if code, problem := typeProblem(e.Type); problem != "" {
		add("type", code, "%s", problem)
	}
	switch {
	case e.Time.IsZero():
		add("time", ProblemRequired, "required")
	case e.Time.Year() < 2000:
		add("time", ProblemOutOfRange, "before the year 2000")
	case e.Time.After(now.Add(MaxClockSkew)):
		add("time", ProblemInFuture, "more than %s in the future", MaxClockSkew)
	}
	if len(e.Route) > MaxRouteLength {
		add("route", ProblemTooLong, "longer than %d bytes", MaxRouteLength)
	}
	if e.Method != "" && !knownMethod(e.Method) {
		add("method", ProblemInvalidValue, "unknown HTTP method %q", e.Method)
	}
	if e.Status != 0 && (e.Status < 100 || e.Status > 599) {
		add("status", ProblemOutOfRange, "must be an HTTP status between 100 and 599")
	}
	for _, m := range []struct {
		field string
		v     int64
	}{{"latency_us", e.LatencyMicros}, {"request_bytes", e.RequestBytes}, {"response_bytes", e.ResponseBytes}} {
		if m.v < 0 {
			add(m.field, ProblemOutOfRange, "negative")
		} else if m.v > MaxMeasure {
			add(m.field, ProblemOutOfRange, "more than %d", MaxMeasure)
		}
	}
	if e.Units < 0 {
		add("units", ProblemOutOfRange, "negative")
	} else if e.Units > MaxUnits {
		add("units", ProblemOutOfRange, "more than %d", MaxUnits)
	}
	if len(e.RequestID) > MaxRequestIDLength {
		add("request_id", ProblemTooLong, "longer than %d bytes", MaxRequestIDLength)
	}
	if len(e.ClientID) > MaxClientIDLength {
		add("client_id", ProblemTooLong, "longer than %d bytes", MaxClientIDLength)
	} else if hasControl(e.ClientID) {
		// Event ids are derived from the client's id with NUL as the
		// separator: a NUL inside one could make a live id equal to a test
		// id, and ingest would keep only one of the two.
		add("client_id", ProblemInvalidCharacters, "contains a control character")
	}
	if len(e.Dimensions) > MaxDimensions || len(keys) > MaxDimensions {
		add("dimensions", ProblemTooMany, "more than %d entries", MaxDimensions)
	}
	// Problems with dimensions are listed in key order, which for a map
	// costs a sorted copy of the keys; make it only when there is one to
	// list.
	listDimensions := func(keys, values []string) {
		for i, k := range keys {
			switch v := values[i]; {
			case len(k) > MaxDimensionKey:
				add("dimensions."+ClipName(k), ProblemTooLong, "key must be lower case letters, digits and _, at most %d bytes", MaxDimensionKey)
			case !dimKeyChars.MatchString(k):
				add("dimensions."+ClipName(k), ProblemInvalidCharacters, "key must be lower case letters, digits and _, at most %d bytes", MaxDimensionKey)
			case len(v) > MaxDimensionValue:
				add("dimensions."+k, ProblemTooLong, "value longer than %d bytes", MaxDimensionValue)
			}
		}
	}
	for k, v := range e.Dimensions {
		if !validDimension(k, v) {
			listDimensions(e.DimensionArrays())
			break
		}
	}
	for i, k := range keys {
		if !validDimension(k, values[i]) {
			listDimensions(keys, values)
			break
		}
	}
	return ps
}

// validDimension reports whether Validate finds nothing wrong with the
// dimension k: v.
func validDimension(k, v string) bool {
	return len(k) <= MaxDimensionKey && dimKeyChars.MatchString(k) && len(v) <= MaxDimensionValue
}

// Normalize puts fields in canonical form: UTC time truncated to the
// microsecond (what ClickHouse keeps) and empty dimensions as nil.
func (e *Event) Normalize() {
	e.Time = e.Time.UTC().Truncate(time.Microsecond)
	if len(e.Dimensions) == 0 {
		e.Dimensions = nil
	}
}

// Decode parses the wire form strictly: unknown fields, trailing data and
// wrong types are errors wrapping ErrMalformed. It then validates against
// now and returns the *ValidationError, if any, alongside the event.
func Decode(b []byte, now time.Time) (Event, error) {
	return DecodeInterned(b, now, nil)
}

// DecodeInterned is Decode sharing repeated string values through in (a
// decoder of many events keeps one per goroutine).
func DecodeInterned(b []byte, now time.Time, in *Interner) (Event, error) {
	var e Event
	if err := decodeEvent(b, &e, in); err != nil {
		return Event{}, err
	}
	e.Normalize()
	if err := e.Validate(now); err != nil {
		return e, err
	}
	return e, nil
}

// DecodeFlat is DecodeInterned for a reader that keeps dimensions as
// key-sorted parallel arrays, as the raw events table stores them: it
// decodes into *e, which must be the zero Event (a reader of many events
// decodes each in place in its batch, never copying the struct), leaves
// Dimensions nil, and returns the dimensions as keys and values (one
// allocation for both), never through a map. Everything else, errors and
// validation problems included, is what DecodeInterned returns; after an
// error wrapping ErrMalformed *e is left partly filled.
func DecodeFlat(b []byte, now time.Time, in *Interner, e *Event) (keys, values []string, err error) {
	var scratch []string
	if in != nil {
		scratch = in.pairs[:0]
	}
	pairs, err := decodeFlat(b, e, in, scratch)
	if in != nil {
		in.pairs = pairs[:0] // kept for the next event
	}
	if err != nil {
		return nil, nil, err
	}
	e.Normalize()
	if n := len(pairs) / 2; n > 0 {
		both := make([]string, 2*n)
		keys, values = both[:n:n], both[n:]
		for i := range n {
			keys[i], values[i] = pairs[2*i], pairs[2*i+1]
		}
		if n <= MaxDimensions {
			// Insertion sort: a handful of keys, and no allocation.
			for i := 1; i < n; i++ {
				for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
					keys[j], keys[j-1] = keys[j-1], keys[j]
					values[j], values[j-1] = values[j-1], values[j]
				}
			}
		} else {
			sort.Sort(byKey{keys, values})
		}
	}
	return keys, values, e.validate(now, keys, values)
}

// byKey sorts parallel key and value arrays by key.
type byKey struct{ keys, values []string }

func (s byKey) Len() int           { return len(s.keys) }
func (s byKey) Less(i, j int) bool { return s.keys[i] < s.keys[j] }
func (s byKey) Swap(i, j int) {
	s.keys[i], s.keys[j] = s.keys[j], s.keys[i]
	s.values[i], s.values[j] = s.values[j], s.values[i]
}

// NewEventID returns a fresh UUIDv7: time-ordered, so ids sort with the
// events they name, and unique without coordination between edges.
func NewEventID() uuid.UUID { return uuid.Must(uuid.NewV7()) }

// clientNamespace scopes ids derived from client event ids.
var clientNamespace = uuid.MustParse("6f1b2a7e-5d1c-4c8e-9a43-1f0e5b7c2d90")

// ClientEventID derives the event id for a server-reported event from the
// account, its environment and the client's own id, so that a retried
// report is recognised as the same event everywhere downstream, and a test
// key's "job-1" is never the same event as a live key's "job-1" (ingest
// drops a second copy of an id within a batch, which could otherwise drop
// the billable one). Live ids are derived as before the environment was
// part of them, so reports retried across that change stay one event.
func ClientEventID(accountID string, env Environment, clientID string) uuid.UUID {
	if env == Test {
		return uuid.NewSHA1(clientNamespace, []byte(accountID+"\x00test\x00"+clientID))
	}
	return uuid.NewSHA1(clientNamespace, []byte(accountID+"\x00"+clientID))
}

// DimensionArrays returns the dimensions as parallel, key-sorted arrays, the
// form the raw events table stores them in.
func (e *Event) DimensionArrays() (keys, values []string) {
	// One allocation for both (ingest calls this for every event).
	n := len(e.Dimensions)
	both := make([]string, 0, 2*n)
	for k := range e.Dimensions {
		both = append(both, k)
	}
	keys = both[:n:n]
	slices.Sort(keys)
	values = both[n : 2*n]
	for i, k := range keys {
		values[i] = e.Dimensions[k]
	}
	return keys, values
}

// charset matches non-empty ASCII strings drawn from a set of characters,
// optionally starting with a lower-case letter: the patterns above, checked
// without a regexp engine because ingest checks them for every event.
type charset struct {
	// allowed is indexed by byte, so that each byte of a string costs one
	// load rather than a comparison per range of the set.
	allowed    [256]bool
	lowerFirst bool
}

func newCharset(chars string, lowerFirst bool) charset {
	c := charset{lowerFirst: lowerFirst}
	for i := 0; i < len(chars); i++ {
		c.allowed[chars[i]] = true
	}
	return c
}

// MatchString reports whether s is made of the set's characters only.
func (c *charset) MatchString(s string) bool {
	if s == "" || c.lowerFirst && (s[0] < 'a' || s[0] > 'z') {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !c.allowed[s[i]] {
			return false
		}
	}
	return true
}
