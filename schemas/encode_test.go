package schemas

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/uuid"
)

// nastyRunes are the characters encoding/json treats specially, plus
// ordinary ASCII and multi-byte text.
var nastyRunes = []string{"a", "Z", "0", " ", "\"", "\\", "/", "<", ">", "&", "\n", "\r", "\t", "\b", "\f",
	"\x00", "\x01", "\x1f", "\x7f", "é", "日本", "\u2028", "\u2029", "\ufffd", "😀", "\xff", "\xc3", "\xed\xa0\x80"}

func randomString(r *rand.Rand, max int) string {
	var b bytes.Buffer
	for range r.IntN(max + 1) {
		b.WriteString(nastyRunes[r.IntN(len(nastyRunes))])
	}
	return b.String()
}

func randomInt(r *rand.Rand) int64 {
	switch r.IntN(4) {
	case 0:
		return 0
	case 1:
		return -r.Int64()
	default:
		return r.Int64N(1 << uint(r.IntN(62)+1))
	}
}

func randomEvent(r *rand.Rand) Event {
	var id uuid.UUID
	for i := range id {
		id[i] = byte(r.Uint32())
	}
	e := Event{
		Version:       r.IntN(3),
		ID:            id,
		AccountID:     randomString(r, 12),
		Environment:   Environment(randomString(r, 5)),
		KeyID:         randomString(r, 12),
		Type:          randomString(r, 8),
		Time:          time.Unix(r.Int64N(1<<34)-1<<33, r.Int64N(1e9)).In(time.FixedZone("", (r.IntN(48)-24)*1800)),
		Route:         randomString(r, 10),
		Method:        randomString(r, 3),
		Status:        int(randomInt(r) % 1000),
		LatencyMicros: randomInt(r),
		RequestBytes:  randomInt(r),
		ResponseBytes: randomInt(r),
		Units:         randomInt(r),
		RequestID:     randomString(r, 10),
		ClientID:      randomString(r, 10),
	}
	if r.IntN(3) > 0 {
		e.Dimensions = map[string]string{}
		for range r.IntN(12) {
			e.Dimensions[randomString(r, 6)] = randomString(r, 10)
		}
	}
	return e
}

func TestEncoderAgreesWithEncodingJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 11))
	for i := range 20000 {
		e := randomEvent(r)
		if i%10 == 0 {
			e.Time = e.Time.UTC().Truncate(time.Microsecond)
		}
		want, wantErr := json.Marshal(&e)
		got, err := e.Encode()
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("event %d: error %v, encoding/json error %v", i, err, wantErr)
		}
		if err == nil && !bytes.Equal(got, want) {
			t.Fatalf("event %d:\n got %s\nwant %s", i, got, want)
		}
	}
}

func TestEncoderRefusesTimesOutsideRFC3339(t *testing.T) {
	e := Event{Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}
	if _, err := e.Encode(); err == nil {
		t.Fatal("year 10000 encoded without error")
	}
}

func BenchmarkEncode(b *testing.B) {
	e := Event{Version: EventVersion, ID: uuid.New(), AccountID: "acct_1234567890", Environment: Live,
		KeyID: "key_1234567890", Type: "api_call", Time: time.Now().UTC().Truncate(time.Microsecond),
		Route: "/v1/widgets/{id}", Method: "GET", Status: 200, LatencyMicros: 1234, RequestBytes: 10,
		ResponseBytes: 11, Units: 1, RequestID: "req_0123456789abcdef"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.Encode(); err != nil {
			b.Fatal(err)
		}
	}
}
