package edge

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/tollgate-dev/tollgate/schemas"
)

// MaxBatch is the most events one POST /v1/events may carry.
const MaxBatch = 1000

// MaxBatchBytes bounds the request body of POST /v1/events.
const MaxBatchBytes = 8 << 20

// ReportedEvent is one server-reported usage event as a client sends it.
// Account, environment and key come from the API key, never the body.
type ReportedEvent struct {
	// ID is the client's own id; a retry with the same id is the same event.
	ID   string `json:"id"`
	Type string `json:"type"`
	// Time is required: with ID it identifies the event, so a retry must
	// send the same time to be recognised downstream.
	Time       time.Time         `json:"time"`
	Units      *int64            `json:"units,omitempty"`
	Dimensions map[string]string `json:"dimensions,omitempty"`
}

// ItemResult is the outcome of one event in a batch.
type ItemResult struct {
	Index   int                  `json:"index"`
	ID      string               `json:"id,omitempty"`
	EventID string               `json:"event_id,omitempty"`
	Status  string               `json:"status"` // accepted, duplicate or rejected
	Errors  []schemas.FieldError `json:"errors,omitempty"`
	// Warnings, on an accepted or duplicate event, say what it will not
	// do: an event of a type no meter counts is stored, and is in no usage
	// and no invoice until a meter counts its type.
	Warnings []schemas.FieldError `json:"warnings,omitempty"`
}

// BatchResult is the response of POST /v1/events.
type BatchResult struct {
	Accepted   int          `json:"accepted"`
	Duplicates int          `json:"duplicates"`
	Rejected   int          `json:"rejected"`
	Results    []ItemResult `json:"results"`
	RequestID  string       `json:"request_id"`
}

func (s *Server) reportEvents(c echo.Context) error {
	k := c.Get("key").(*Key)
	// SDKs gzip large batches: the bound is on the batch as decoded, so a
	// small body that inflates past it is refused like a large one.
	var from io.Reader = c.Request().Body
	switch enc := strings.ToLower(strings.TrimSpace(c.Request().Header.Get(echo.HeaderContentEncoding))); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(from)
		if err != nil {
			return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_body", "The request body is not gzip data, as its Content-Encoding says.")
		}
		defer zr.Close()
		from = zr
	default:
		return NewAPIError(http.StatusUnsupportedMediaType, TypeInvalidRequest, "unsupported_content_encoding",
			fmt.Sprintf("Content-Encoding %q is not supported: send the batch as it is or gzip-compressed.", schemas.ClipName(enc)))
	}
	body, err := io.ReadAll(io.LimitReader(from, MaxBatchBytes+1))
	if err != nil {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_body", "Could not read the request body.")
	}
	if len(body) > MaxBatchBytes {
		return NewAPIError(http.StatusRequestEntityTooLarge, TypeInvalidRequest, "payload_too_large",
			fmt.Sprintf("The request body is larger than %d bytes.", MaxBatchBytes))
	}
	// The body may have taken long to come (8 MiB, chunked): the key must
	// still be usable once it has, or a key revoked or expired meanwhile
	// would report usage that is billed. The fasthttp front reads the body
	// before this handler runs, so its check comes after the body too.
	if _, err := s.authenticateCall(c.Request().Context(), callInfoOf(c.Request())); err != nil {
		return err
	}
	events, err := decodeBatch(body)
	if err != nil {
		return err
	}
	now := s.now()
	out := BatchResult{Results: make([]ItemResult, len(events)), RequestID: c.Response().Header().Get(HeaderRequestID)}
	// A repeat within the batch is what ingest would count once: the same
	// id, type and second (its row key). The same id with another type or
	// time is another event, as it is across batches.
	type row struct {
		id     uuid.UUID
		second int64
		typ    string
	}
	seen := make(map[row]bool, len(events))
	counted := s.counted.get(s)
	for i, raw := range events {
		r := &out.Results[i]
		r.Index = i
		ev, id, problems := s.reportedEvent(k, raw, now)
		r.ID = id
		if len(problems) > 0 {
			r.Status, r.Errors = "rejected", problems
			out.Rejected++
			continue
		}
		r.EventID = ev.ID.String()
		if counted != nil && !counted[ev.Type] {
			r.Warnings = []schemas.FieldError{{Field: "type", Code: schemas.ProblemUnknownEventType, Reason: fmt.Sprintf(
				"no meter counts events of type %q: the event is stored, and is in no usage and no invoice until a meter counts its type", ev.Type)}}
		}
		k := row{id: ev.ID, second: ev.Time.Unix(), typ: ev.Type}
		if seen[k] {
			r.Status = "duplicate"
			out.Duplicates++
			continue
		}
		seen[k] = true
		s.deps.Emitter.Emit(ev)
		r.Status = "accepted"
		out.Accepted++
	}
	return c.JSON(http.StatusOK, out)
}

// countedTypes holds the event types the meters in force count, for the
// warnings of POST /v1/events. It is read again in the background, at
// most once every countedTypesRefresh and one read at a time, so a
// Postgres gone silent costs one read at a time, not one per batch.
type countedTypes struct {
	mu      sync.Mutex
	types   map[string]bool // nil until a read succeeds: no warnings
	readAt  time.Time       // when types was read
	at      time.Time       // when the last read began
	reading bool
	done    chan struct{} // closed when the read under way ends
	failed  bool          // the last read failed
}

const (
	// countedTypesRefresh is how often the meters are read again; the
	// catalog itself goes to Postgres only every aggregator.meters_refresh.
	countedTypesRefresh = time.Second
	// countedTypesWait is how long after a read begins the batches that
	// find the list old wait for it (unless the read before it failed):
	// the catalog answers from memory, or after one query, well within it.
	countedTypesWait = 100 * time.Millisecond
)

// get returns the event types the meters count (nil: no warnings),
// starting a read in the background when one is due. A list read more
// than two periods ago (the edge had no reported events for a while) is
// not used as it is: it may lack a meter created since, and a batch told
// that its events count nowhere when they do is worse than one not told.
// Such a batch waits for the read under way until countedTypesWait after
// it began (not at all when the read before it failed: Postgres is likely
// out of reach), and goes without warnings if it has not ended by then.
func (c *countedTypes) get(s *Server) map[string]bool {
	if s.deps.Meters == nil {
		return nil
	}
	c.mu.Lock()
	types, fresh := c.types, time.Since(c.readAt) <= 2*countedTypesRefresh
	if !c.reading && time.Since(c.at) >= countedTypesRefresh {
		c.reading, c.at, c.done = true, time.Now(), make(chan struct{})
		go c.read(s, c.done)
	}
	var wait <-chan struct{}
	left := countedTypesWait - time.Since(c.at)
	if !fresh && c.reading && !c.failed && left > 0 {
		wait = c.done
	}
	c.mu.Unlock()
	if fresh {
		return types
	}
	if wait == nil {
		return nil
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-wait:
	case <-t.C:
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.readAt) > 2*countedTypesRefresh {
		return nil // the read failed
	}
	return c.types
}

func (c *countedTypes) read(s *Server, done chan struct{}) {
	defer close(done)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ms, err := s.deps.Meters.Meters(ctx)
	var types map[string]bool
	if err == nil {
		types = make(map[string]bool, len(ms))
		for _, m := range ms {
			types[m.EventType] = true
		}
	} else {
		s.log.Debug("cannot list the meters; reported events are not checked against them", "err", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reading, c.failed = false, err != nil
	if err == nil {
		c.types, c.readAt = types, time.Now()
	}
}

// decodeBatch reads {"events": [...]} one element at a time, so a body of
// millions of tiny elements stops at the one past MaxBatch instead of
// being decoded whole first. Nothing may follow the object.
func decodeBatch(body []byte) ([]json.RawMessage, error) {
	invalid := func(why string) error {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_json",
			"The body must be a JSON object {\"events\": [...]}: "+why)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, invalid("it does not start with {")
	}
	var events []json.RawMessage
	found := false
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, invalid(err.Error())
		}
		if name, _ := t.(string); name != "events" || found {
			return nil, invalid(fmt.Sprintf("unexpected field %q", t))
		}
		found = true
		t, err = dec.Token()
		if err != nil {
			return nil, invalid(err.Error())
		}
		if t == nil { // "events": null
			continue
		}
		if t != json.Delim('[') {
			return nil, invalid("events is not an array")
		}
		for dec.More() {
			if len(events) == MaxBatch {
				return nil, NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "batch_too_large",
					fmt.Sprintf("A batch may hold at most %d events; this one has more.", MaxBatch))
			}
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				return nil, invalid(err.Error())
			}
			events = append(events, raw)
		}
		if _, err := dec.Token(); err != nil { // ]
			return nil, invalid(err.Error())
		}
	}
	if _, err := dec.Token(); err != nil { // }
		return nil, invalid(err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, invalid("something follows the object")
	}
	if len(events) == 0 {
		return nil, NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "empty_batch", "The batch has no events.")
	}
	return events, nil
}

// decodeProblem names the field a decoding error is about, when it can.
func decodeProblem(err error) schemas.FieldError {
	var te *json.UnmarshalTypeError
	var pe *time.ParseError
	switch {
	case errors.As(err, &te) && te.Field != "" && wholeNumber(te.Type, te.Value):
		// A whole number the field's type cannot hold: of the right JSON
		// type, and out of range.
		return schemas.FieldError{Field: te.Field, Code: schemas.ProblemOutOfRange, Reason: "a whole number too large to count: " + te.Value}
	case errors.As(err, &te) && te.Field != "":
		return schemas.FieldError{Field: te.Field, Code: schemas.ProblemWrongType, Reason: fmt.Sprintf("want a JSON %s, got %s", jsonKind(te.Type), te.Value)}
	case errors.As(err, &pe):
		return schemas.FieldError{Field: "time", Code: schemas.ProblemInvalidTime, Reason: "not an RFC 3339 time with a zone: " + err.Error()}
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return schemas.FieldError{Field: schemas.ClipName(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)), Code: schemas.ProblemUnknownField, Reason: "unknown field"}
	}
	return schemas.FieldError{Field: "", Code: schemas.ProblemMalformed, Reason: "not a valid event object: " + err.Error()}
}

// wholeNumber reports whether an UnmarshalTypeError's value is a whole
// number given for an integer field (so too large for it): encoding/json
// names a JSON number's value "number N".
func wholeNumber(t reflect.Type, value string) bool {
	n, ok := strings.CutPrefix(value, "number ")
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
	default:
		return false
	}
	return ok && n != "" && !strings.ContainsAny(n, ".eE")
}

// reportedFields are ReportedEvent's field names, exactly as spelled.
var reportedFields = [...]string{"id", "type", "time", "units", "dimensions"}

// strictNames holds an event object to what encoding/json lets pass: a
// field name in other case ("Units" read as units) and a name given twice
// (the last one silently winning), at the top level and in dimensions. A
// client that sends either has a bug the edge should name, not guess
// around: the event would be counted with a value the client may not have
// meant. Anything that is not a well-formed object is left to the decoder
// to report.
func strictNames(raw []byte) *schemas.FieldError {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	var seen [len(reportedFields)]bool
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil
		}
		name, _ := t.(string)
		known := -1
		for i, f := range reportedFields {
			if name == f {
				known = i
			} else if strings.EqualFold(name, f) {
				return &schemas.FieldError{Field: name, Code: schemas.ProblemUnknownField, Reason: fmt.Sprintf("unknown field (names are case-sensitive: %q)", f)}
			}
		}
		if known < 0 {
			// Named here, not left to the decoder: it stops at the first
			// value it cannot take, which may come later in the object
			// (a time given as a number) and names no field.
			return &schemas.FieldError{Field: schemas.ClipName(name), Code: schemas.ProblemUnknownField, Reason: "unknown field"}
		}
		if seen[known] {
			return &schemas.FieldError{Field: name, Code: schemas.ProblemDuplicateField, Reason: "given twice"}
		}
		seen[known] = true
		var value json.RawMessage
		if dec.Decode(&value) != nil {
			return nil
		}
		if name == "dimensions" {
			if p := uniqueNames(value); p != nil {
				return p
			}
		}
		// A time that is not a string fails inside time.Time's own
		// decoding, with an error that names no field.
		if v := bytes.TrimSpace(value); name == "time" && len(v) > 0 && v[0] != '"' && string(v) != "null" {
			return &schemas.FieldError{Field: name, Code: schemas.ProblemWrongType, Reason: "want an RFC 3339 time as a JSON string"}
		}
		// Left out, units is 1; null is a client's unset value, which
		// would be counted as 1 without a word.
		if name == "units" && string(bytes.TrimSpace(value)) == "null" {
			return &schemas.FieldError{Field: name, Code: schemas.ProblemNull, Reason: "null: give a whole number, or leave units out for 1"}
		}
	}
	return nil
}

// uniqueNames names a key the dimensions object gives twice.
func uniqueNames(value json.RawMessage) *schemas.FieldError {
	dec := json.NewDecoder(bytes.NewReader(value))
	t, err := dec.Token()
	if err != nil || t != json.Delim('{') {
		return nil // null, or not an object: the decoder reports the latter
	}
	seen := map[string]bool{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil
		}
		k, _ := t.(string)
		if seen[k] {
			return &schemas.FieldError{Field: "dimensions." + schemas.ClipName(k), Code: schemas.ProblemDuplicateField, Reason: "given twice"}
		}
		seen[k] = true
		var skip json.RawMessage
		if dec.Decode(&skip) != nil {
			return nil
		}
	}
	return nil
}

// jsonKind is how a client would name the JSON type a Go type decodes.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "whole number"
	case reflect.String:
		return "string"
	case reflect.Map, reflect.Struct:
		return "object"
	}
	return t.String()
}

func (s *Server) reportedEvent(k *Key, raw json.RawMessage, now time.Time) (schemas.Event, string, []schemas.FieldError) {
	if p := strictNames(raw); p != nil {
		return schemas.Event{}, "", []schemas.FieldError{*p}
	}
	var re ReportedEvent
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&re); err != nil {
		return schemas.Event{}, "", []schemas.FieldError{decodeProblem(err)}
	}
	var ps []schemas.FieldError
	if re.ID == "" {
		ps = append(ps, schemas.FieldError{Field: "id", Code: schemas.ProblemRequired, Reason: "required: the client's own event id makes retries safe"})
	}
	ps = append(ps, brokenText(raw, &re)...)
	if re.Time.IsZero() {
		ps = append(ps, schemas.FieldError{Field: "time", Code: schemas.ProblemRequired, Reason: "required (RFC 3339)"})
	} else if oldest := now.Add(-s.cfg.MaxEventAge); re.Time.Before(oldest) && re.Time.UTC().Year() >= 2000 {
		// The year is read in UTC, as the schema's check of it is: read in
		// the client's offset, 2000-01-01T04:30Z sent as 1999-12-31T23:30-05:00
		// passed both checks and was accepted, then set aside by ingest as
		// too late to count.
		ps = append(ps, schemas.FieldError{Field: "time", Code: schemas.ProblemTooOld, Reason: fmt.Sprintf(
			"older than %s (edge.max_event_age): too late to be counted", s.cfg.MaxEventAge)})
	}
	units := int64(1)
	if re.Units != nil {
		units = *re.Units
	}
	ev := schemas.Event{
		Version:     schemas.EventVersion,
		ID:          schemas.ClientEventID(k.AccountID, k.Environment, re.ID),
		AccountID:   k.AccountID,
		Environment: k.Environment,
		KeyID:       k.ID,
		Type:        re.Type,
		Time:        re.Time,
		Units:       units,
		ClientID:    re.ID,
		Dimensions:  re.Dimensions,
	}
	ev.Normalize()
	// Every problem, the edge's own and the event's, then bounded once, so
	// the last one says how many more there truly are.
	for _, p := range ev.Problems(now) {
		if p.Field == "client_id" {
			p.Field = "id"
		}
		if (p.Field == "time" && re.Time.IsZero()) || (p.Field == "id" && re.ID == "") {
			continue // already reported above
		}
		ps = append(ps, p)
	}
	return ev, re.ID, schemas.BoundProblems(ps)
}

// brokenText reports the strings of re that JSON decoding changed: Go's
// decoder turns bytes that are not UTF-8, and an escaped lone UTF-16
// surrogate, into U+FFFD. Two ids that differ only there would decode to
// one id and one event id, and the second client event would be dropped
// downstream as a retry of the first; two dimension values would be
// counted as one. A U+FFFD the client sent as such is kept.
func brokenText(raw []byte, re *ReportedEvent) []schemas.FieldError {
	const why = "not valid UTF-8 (or a lone UTF-16 surrogate escape): it could not be told apart from other text"
	changed := func(s string) bool { return strings.ContainsRune(s, utf8.RuneError) }
	if !changed(re.ID) && !changed(re.Type) && !mapChanged(re.Dimensions, changed) {
		return nil
	}
	if utf8.Valid(raw) && !loneSurrogate(raw) {
		return nil
	}
	var ps []schemas.FieldError
	if changed(re.ID) {
		ps = append(ps, schemas.FieldError{Field: "id", Code: schemas.ProblemInvalidText, Reason: why})
	}
	if changed(re.Type) {
		ps = append(ps, schemas.FieldError{Field: "type", Code: schemas.ProblemInvalidText, Reason: why})
	}
	for _, k := range slices.Sorted(maps.Keys(re.Dimensions)) {
		if changed(k) || changed(re.Dimensions[k]) {
			ps = append(ps, schemas.FieldError{Field: "dimensions." + schemas.ClipName(k), Code: schemas.ProblemInvalidText, Reason: why})
		}
	}
	return ps
}

func mapChanged(m map[string]string, changed func(string) bool) bool {
	for k, v := range m {
		if changed(k) || changed(v) {
			return true
		}
	}
	return false
}

// loneSurrogate reports whether JSON text holds a \u escape of a UTF-16
// surrogate that is not half of a pair.
func loneSurrogate(raw []byte) bool {
	hex4 := func(b []byte) (rune, bool) {
		if len(b) < 6 || b[0] != '\\' || b[1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(b[2:6]), 16, 16)
		return rune(n), err == nil
	}
	for i := 0; i < len(raw); i++ {
		if raw[i] != '\\' || i+1 >= len(raw) {
			continue
		}
		r, ok := hex4(raw[i:])
		if !ok {
			i++ // another escape: skip its second byte (it may be a backslash)
			continue
		}
		switch {
		case r >= 0xD800 && r < 0xDC00:
			low, ok := hex4(raw[min(i+6, len(raw)):])
			if !ok || low < 0xDC00 || low > 0xDFFF {
				return true
			}
			i += 11
		case r >= 0xDC00 && r <= 0xDFFF:
			return true
		default:
			i += 5
		}
	}
	return false
}
