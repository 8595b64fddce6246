package schemas

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"
)

// Encode returns the event's wire form: exactly the bytes encoding/json
// gives for Event (TestEncoderAgreesWithEncodingJSON holds it to that),
// written field by field instead of by reflection, because the edge encodes
// one event per call.
func (e *Event) Encode() ([]byte, error) {
	return e.AppendJSON(make([]byte, 0, 384))
}

// AppendJSON appends the event's wire form to dst.
func (e *Event) AppendJSON(dst []byte) ([]byte, error) {
	if y := e.Time.Year(); y < 0 || y > 9999 {
		// Out of RFC 3339's range: let encoding/json report it.
		if _, err := json.Marshal(e); err != nil {
			return dst, fmt.Errorf("encode event %s: %w", e.ID, err)
		}
	}
	b := append(dst, `{"v":`...)
	b = strconv.AppendInt(b, int64(e.Version), 10)
	b = append(b, `,"id":"`...)
	b = appendUUID(b, e.ID)
	b = append(b, `","account_id":`...)
	b = appendString(b, e.AccountID)
	b = append(b, `,"env":`...)
	b = appendString(b, string(e.Environment))
	b = append(b, `,"key_id":`...)
	b = appendString(b, e.KeyID)
	b = append(b, `,"type":`...)
	b = appendString(b, e.Type)
	b = append(b, `,"time":"`...)
	b = e.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = appendOptString(b, `,"route":`, e.Route)
	b = appendOptString(b, `,"method":`, e.Method)
	b = appendOptInt(b, `,"status":`, int64(e.Status))
	b = appendOptInt(b, `,"latency_us":`, e.LatencyMicros)
	b = appendOptInt(b, `,"request_bytes":`, e.RequestBytes)
	b = appendOptInt(b, `,"response_bytes":`, e.ResponseBytes)
	b = append(b, `,"units":`...)
	b = strconv.AppendInt(b, e.Units, 10)
	b = appendOptString(b, `,"request_id":`, e.RequestID)
	b = appendOptString(b, `,"client_id":`, e.ClientID)
	if len(e.Dimensions) > 0 {
		b = append(b, `,"dimensions":{`...)
		var small [8]string
		keys := small[:0]
		for k := range e.Dimensions {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, e.Dimensions[k])
		}
		b = append(b, '}')
	}
	return append(b, '}'), nil
}

// appendOptString writes an omitempty string field.
func appendOptString(b []byte, name, v string) []byte {
	if v == "" {
		return b
	}
	return appendString(append(b, name...), v)
}

// appendOptInt writes an omitempty integer field.
func appendOptInt(b []byte, name string, v int64) []byte {
	if v == 0 {
		return b
	}
	return strconv.AppendInt(append(b, name...), v, 10)
}

func appendUUID(b []byte, id [16]byte) []byte {
	const hex = "0123456789abcdef"
	for i, c := range id {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b = append(b, '-')
		}
		b = append(b, hex[c>>4], hex[c&0xf])
	}
	return b
}

// appendString quotes s as encoding/json does by default: HTML-sensitive
// characters, control characters, U+2028 and U+2029 escaped, invalid UTF-8
// replaced by U+FFFD.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
