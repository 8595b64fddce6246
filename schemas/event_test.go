package schemas

import (
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func validEvent() Event {
	return Event{
		Version:     EventVersion,
		ID:          uuid.MustParse("0193a0d2-6f1e-7c3a-9d2b-4e5f60718293"),
		AccountID:   "acct_123",
		Environment: Live,
		KeyID:       "key_abc",
		Type:        "api_call",
		Time:        now.Add(-time.Minute),
		Route:       "/v1/widgets/{id}",
		Method:      "GET",
		Status:      200,
		Units:       1,
		Dimensions:  map[string]string{"region": "eu", "model": "small"},
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Event)
		fields []string // field:code of each problem that must be reported; none means valid
	}{
		{"a complete event is valid", func(*Event) {}, nil},
		{"unknown schema version is rejected", func(e *Event) { e.Version = 2 }, []string{"v:unsupported_version"}},
		{"missing id is rejected", func(e *Event) { e.ID = uuid.Nil }, []string{"id:required"}},
		{"missing account is rejected", func(e *Event) { e.AccountID = "" }, []string{"account_id:required"}},
		{"account with spaces is rejected", func(e *Event) { e.AccountID = "acct 1" }, []string{"account_id:invalid_characters"}},
		{"over-long account is rejected", func(e *Event) { e.AccountID = strings.Repeat("a", MaxIDLength+1) }, []string{"account_id:too_long"}},
		{"unknown environment is rejected", func(e *Event) { e.Environment = "prod" }, []string{"env:invalid_value"}},
		{"missing type is rejected", func(e *Event) { e.Type = "" }, []string{"type:required"}},
		{"upper-case type is rejected", func(e *Event) { e.Type = "API_CALL" }, []string{"type:invalid_characters"}},
		{"missing time is rejected", func(e *Event) { e.Time = time.Time{} }, []string{"time:required"}},
		{"time far in the future is rejected", func(e *Event) { e.Time = now.Add(MaxClockSkew + time.Second) }, []string{"time:in_future"}},
		{"time within the clock skew is accepted", func(e *Event) { e.Time = now.Add(MaxClockSkew - time.Second) }, nil},
		{"ancient time is rejected", func(e *Event) { e.Time = time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC) }, []string{"time:out_of_range"}},
		{"negative units are rejected", func(e *Event) { e.Units = -1 }, []string{"units:out_of_range"}},
		{"zero units are accepted", func(e *Event) { e.Units = 0 }, nil},
		{"units up to the bound are accepted", func(e *Event) { e.Units = MaxUnits }, nil},
		{"units past the bound are rejected (two could wrap an Int64 sum)", func(e *Event) { e.Units = MaxUnits + 1 }, []string{"units:out_of_range"}},
		{"a client id with NUL is rejected (it could equal another environment's id)", func(e *Event) { e.ClientID = "test\x00job-1" }, []string{"client_id:invalid_characters"}},
		{"a client id with a line break is rejected", func(e *Event) { e.ClientID = "job\n1" }, []string{"client_id:invalid_characters"}},
		{"a client id of any other text is accepted", func(e *Event) { e.ClientID = "job 1/ü:#" }, nil},
		{"unknown method is rejected", func(e *Event) { e.Method = "BREW" }, []string{"method:invalid_value"}},
		{"status outside HTTP range is rejected", func(e *Event) { e.Status = 99 }, []string{"status:out_of_range"}},
		{"negative byte counts are rejected", func(e *Event) { e.RequestBytes, e.ResponseBytes = -1, -2 }, []string{"request_bytes:out_of_range", "response_bytes:out_of_range"}},
		{"measures up to the bound are accepted", func(e *Event) { e.LatencyMicros, e.RequestBytes, e.ResponseBytes = MaxMeasure, MaxMeasure, MaxMeasure }, nil},
		{"measures past the bound are rejected (a few could wrap an Int64 sum)", func(e *Event) {
			e.LatencyMicros, e.RequestBytes, e.ResponseBytes = MaxMeasure+1, 999999999999999999, MaxMeasure+1
		}, []string{"latency_us:out_of_range", "request_bytes:out_of_range", "response_bytes:out_of_range"}},
		{"bad dimension key is rejected", func(e *Event) { e.Dimensions = map[string]string{"Bad Key": "x"} }, []string{"dimensions.Bad Key:invalid_characters"}},
		{"over-long dimension value is rejected", func(e *Event) {
			e.Dimensions = map[string]string{"k": strings.Repeat("v", MaxDimensionValue+1)}
		}, []string{"dimensions.k:too_long"}},
		{"too many dimensions are rejected", func(e *Event) {
			e.Dimensions = map[string]string{}
			for i := 0; i <= MaxDimensions; i++ {
				e.Dimensions[string(rune('a'+i))] = "x"
			}
		}, []string{"dimensions:too_many"}},
		{"every problem is reported at once", func(e *Event) { e.AccountID, e.Units, e.Environment = "", -5, "" }, []string{"account_id:required", "units:out_of_range", "env:invalid_value"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := validEvent()
			c.mutate(&e)
			err := e.Validate(now)
			if len(c.fields) == 0 {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("want *ValidationError, got %v", err)
			}
			got := map[string]bool{}
			for _, p := range ve.Problems {
				got[p.Field+":"+p.Code] = true
				if p.Reason == "" {
					t.Errorf("problem with %s has no reason", p.Field)
				}
			}
			for _, f := range c.fields {
				if !got[f] {
					t.Errorf("problem with %s not reported; got %v", f, ve.Problems)
				}
			}
			if len(ve.Problems) != len(c.fields) {
				t.Errorf("got %d problems, want %d: %v", len(ve.Problems), len(c.fields), ve.Problems)
			}
		})
	}
}

func TestDecodeMalformedRecords(t *testing.T) {
	good, err := func() ([]byte, error) { e := validEvent(); return e.Encode() }()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name      string
		in        string
		malformed bool // ErrMalformed rather than a ValidationError
	}{
		{"empty record is malformed", "", true},
		{"not JSON is malformed", "hello", true},
		{"truncated JSON is malformed", string(good[:len(good)/2]), true},
		{"JSON array is malformed", "[1,2]", true},
		{"unknown field is malformed", strings.Replace(string(good), `{"v":1`, `{"v":1,"surprise":true`, 1), true},
		{"wrong type is malformed", strings.Replace(string(good), `"units":1`, `"units":"one"`, 1), true},
		{"fractional units are malformed", strings.Replace(string(good), `"units":1`, `"units":1.5`, 1), true},
		{"bad uuid is malformed", strings.Replace(string(good), `"id":"0193a0d2`, `"id":"zz93a0d2`, 1), true},
		{"trailing data is malformed", string(good) + `{}`, true},
		{"valid JSON with a missing account is invalid", strings.Replace(string(good), `"account_id":"acct_123"`, `"account_id":""`, 1), false},
		{"null event is invalid", "null", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode([]byte(c.in), now)
			if err == nil {
				t.Fatal("want an error")
			}
			var ve *ValidationError
			if c.malformed != errors.Is(err, ErrMalformed) || (!c.malformed && !errors.As(err, &ve)) {
				t.Fatalf("got %v (malformed=%v)", err, errors.Is(err, ErrMalformed))
			}
		})
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	e := validEvent()
	e.Time = time.Date(2026, 11, 26, 11, 59, 0, 123456789, time.FixedZone("x", 3600))
	e.Normalize()
	b, err := e.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b, now)
	if err != nil {
		t.Fatalf("decode: %v", err)
	}
	if !got.Time.Equal(e.Time) || got.Time.Location() != time.UTC || got.Time.Nanosecond()%1000 != 0 {
		t.Fatalf("time %v, want %v in UTC at microsecond precision", got.Time, e.Time)
	}
	if got.ID != e.ID || got.AccountID != e.AccountID || got.Dimensions["region"] != "eu" || got.Units != 1 {
		t.Fatalf("round trip changed the event: %+v", got)
	}
	keys, values := got.DimensionArrays()
	if strings.Join(keys, ",") != "model,region" || strings.Join(values, ",") != "small,eu" {
		t.Fatalf("dimension arrays %v %v, want key-sorted", keys, values)
	}
}

func TestEventIDs(t *testing.T) {
	t.Run("edge ids are UUIDv7 and increase", func(t *testing.T) {
		a, b := NewEventID(), NewEventID()
		if a.Version() != 7 || b.Version() != 7 {
			t.Fatalf("versions %d %d", a.Version(), b.Version())
		}
		if strings.Compare(a.String(), b.String()) >= 0 {
			t.Fatalf("%s then %s: not increasing", a, b)
		}
	})
	t.Run("client ids map to one event id per account", func(t *testing.T) {
		if ClientEventID("a", Live, "x") != ClientEventID("a", Live, "x") {
			t.Fatal("same client id gave two event ids")
		}
		if ClientEventID("a", Live, "x") == ClientEventID("b", Live, "x") {
			t.Fatal("two accounts share an event id for the same client id")
		}
		if ClientEventID("a", Live, "bx") == ClientEventID("ab", Live, "x") {
			t.Fatal("account and client id are not separated")
		}
	})
	t.Run("a test key's client id is never a live key's event", func(t *testing.T) {
		if ClientEventID("a", Test, "job-1") == ClientEventID("a", Live, "job-1") {
			t.Fatal("test and live reports of one client id share an event id")
		}
		if ClientEventID("a", Test, "job-1") != ClientEventID("a", Test, "job-1") {
			t.Fatal("same test client id gave two event ids")
		}
	})
	t.Run("live ids are those derived before the environment was part of them", func(t *testing.T) {
		// Pinned: a report retried across the change must stay one event.
		if got := ClientEventID("acct_1", Live, "job-1").String(); got != "dc26d6aa-4722-5019-9939-5e18a1533415" {
			t.Fatalf("live id %s changed", got)
		}
	})
}

func FuzzDecode(f *testing.F) {
	e := validEvent()
	b, _ := e.Encode()
	f.Add(b)
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		ev, err := Decode(in, now)
		if err == nil {
			// Whatever decodes cleanly must validate and survive a round trip.
			if verr := ev.Validate(now); verr != nil {
				t.Fatalf("decoded event fails validation: %v", verr)
			}
			b, err := ev.Encode()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Decode(b, now); err != nil {
				t.Fatalf("re-decode: %v", err)
			}
		}
	})
}

// benchEvent is a typical edge event, encoded.
func benchEvent(b *testing.B, now time.Time) []byte {
	e := Event{ID: NewEventID(), Version: EventVersion, AccountID: "acct_bench", Environment: Live,
		KeyID: "key_bench", Type: "api_call", Time: now, Route: "/v1/widgets/{id}", Method: "GET", Status: 200,
		LatencyMicros: 1234, RequestBytes: 100, ResponseBytes: 512, Units: 1, RequestID: "req_123",
		Dimensions: map[string]string{"region": "eu", "tier": "gold"}}
	raw, err := e.Encode()
	if err != nil {
		b.Fatal(err)
	}
	return raw
}

// BenchmarkDecode measures the strict decode and validation of one
// typical event, the per-event cost ingest pays before inserting.
func BenchmarkDecode(b *testing.B) {
	now := time.Now()
	raw := benchEvent(b, now)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(raw, now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeInterned is the same with the repeated strings shared,
// as ingest decodes a batch.
func BenchmarkDecodeInterned(b *testing.B) {
	now := time.Now()
	raw := benchEvent(b, now)
	var in Interner
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeInterned(raw, now, &in); err != nil {
			b.Fatal(err)
		}
	}
}

// TestCharsetsMatchTheirPatterns checks the hand-written character checks
// against the regular expressions they stand for, on every string of up to
// three characters over an alphabet that straddles each class's edges.
func TestCharsetsMatchTheirPatterns(t *testing.T) {
	cases := []struct {
		name string
		set  charset
		re   *regexp.Regexp
	}{
		{"identifier", identChars, regexp.MustCompile(`^[A-Za-z0-9_.:-]+$`)},
		{"event type", typeChars, regexp.MustCompile(`^[a-z][a-z0-9_.]*$`)},
		{"dimension key", dimKeyChars, regexp.MustCompile(`^[a-z][a-z0-9_]*$`)},
	}
	alphabet := []string{"", "a", "z", "A", "Z", "0", "9", "_", ".", ":", "-", "@", "`", "{", "/", " ", "é", "\x00"}
	for _, c := range cases {
		for _, x := range alphabet {
			for _, y := range alphabet {
				for _, z := range alphabet {
					s := x + y + z
					if got, want := c.set.MatchString(s), c.re.MatchString(s); got != want {
						t.Fatalf("%s: %q matched %v, the pattern says %v", c.name, s, got, want)
					}
				}
			}
		}
	}
}

// An event's problems make a message of bounded size whatever the event
// holds: at most MaxProblems listed, the last saying how many more there
// are, and no name from the input quoted whole. A record of thousands of
// bad dimension keys once gave a reason ten times its size, too large for
// the dead-letter topic, and ingest stopped on it.
func TestProblemsAreBoundedWhateverTheEventHolds(t *testing.T) {
	e := validEvent()
	e.Dimensions = map[string]string{}
	for i := range 5000 {
		e.Dimensions["Bad"+strings.Repeat("k", i%3)+strings.Repeat("x", 4)+string(rune('a'+i%26))+strings.Repeat("0", i/26%5)+"_"+strings.Repeat("y", i)] = ""
	}
	var ve *ValidationError
	if err := e.Validate(now); !errors.As(err, &ve) {
		t.Fatalf("want a ValidationError, got %v", err)
	}
	if len(ve.Problems) != MaxProblems+1 {
		t.Fatalf("%d problems listed, want %d", len(ve.Problems), MaxProblems+1)
	}
	last := ve.Problems[MaxProblems]
	// 5,001 problems: too many dimensions, then each of the 5,000 keys.
	if !strings.HasSuffix(last.Reason, "(and 4980 more problems, not listed)") {
		t.Fatalf("last problem %q does not say how many more there are", last.Error())
	}
	for _, p := range ve.Problems {
		if len(p.Field) > len("dimensions.")+maxQuoted {
			t.Fatalf("field name of %d bytes quoted: %.100s…", len(p.Field), p.Field)
		}
	}
	if n := len(ve.Error()); n > 4<<10 {
		t.Fatalf("message of %d bytes", n)
	}

	// A field name the decoder does not know is quoted clipped too.
	long := strings.Repeat("é", 100_000)
	_, err := Decode([]byte(`{"`+long+`":1}`), now)
	if !errors.Is(err, ErrMalformed) || len(err.Error()) > 200 || !strings.Contains(err.Error(), "é…") {
		t.Fatalf("unknown field of %d bytes: error of %d bytes: %.200s", len(long), len(err.Error()), err)
	}
}

func TestClipCutsAtACharacter(t *testing.T) {
	for _, c := range []struct {
		in   string
		max  int
		want string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"abcdefghijkl", 10, "abcdefg…"},
		{"ééééé", 8, "éé…"}, // é is 2 bytes, … 3: 4 bytes of é fit, not a half of one
		{"abc", 2, "…"},
	} {
		if got := Clip(c.in, c.max); got != c.want {
			t.Errorf("Clip(%q, %d) = %q, want %q", c.in, c.max, got, c.want)
		}
	}
}
