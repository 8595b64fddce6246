package edge

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

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
	body, err := io.ReadAll(io.LimitReader(c.Request().Body, MaxBatchBytes+1))
	if err != nil {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_body", "Could not read the request body.")
	}
	if len(body) > MaxBatchBytes {
		return NewAPIError(http.StatusRequestEntityTooLarge, TypeInvalidRequest, "payload_too_large",
			fmt.Sprintf("The request body is larger than %d bytes.", MaxBatchBytes))
	}
	var in struct {
		Events []json.RawMessage `json:"events"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "invalid_json",
			"The body must be a JSON object {\"events\": [...]}: "+err.Error())
	}
	if len(in.Events) == 0 {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "empty_batch", "The batch has no events.")
	}
	if len(in.Events) > MaxBatch {
		return NewAPIError(http.StatusBadRequest, TypeInvalidRequest, "batch_too_large",
			fmt.Sprintf("A batch may hold at most %d events; this one has %d.", MaxBatch, len(in.Events)))
	}
	now := s.now()
	out := BatchResult{Results: make([]ItemResult, len(in.Events)), RequestID: c.Response().Header().Get(HeaderRequestID)}
	seen := make(map[string]bool, len(in.Events))
	for i, raw := range in.Events {
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
		if seen[id] {
			r.Status = "duplicate"
			out.Duplicates++
			continue
		}
		seen[id] = true
		s.deps.Emitter.Emit(ev)
		r.Status = "accepted"
		out.Accepted++
	}
	return c.JSON(http.StatusOK, out)
}

func (s *Server) reportedEvent(k *Key, raw json.RawMessage, now time.Time) (schemas.Event, string, []schemas.FieldError) {
	var re ReportedEvent
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&re); err != nil {
		return schemas.Event{}, "", []schemas.FieldError{{Field: "", Reason: "not a valid event object: " + err.Error()}}
	}
	var ps []schemas.FieldError
	if re.ID == "" {
		ps = append(ps, schemas.FieldError{Field: "id", Reason: "required: the client's own event id makes retries safe"})
	}
	if re.Time.IsZero() {
		ps = append(ps, schemas.FieldError{Field: "time", Reason: "required (RFC 3339)"})
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
	if err := ev.Validate(now); err != nil {
		if ve, ok := err.(*schemas.ValidationError); ok {
			for _, p := range ve.Problems {
				if p.Field == "client_id" {
					p.Field = "id"
				}
				if (p.Field == "time" && re.Time.IsZero()) || (p.Field == "id" && re.ID == "") {
					continue // already reported above
				}
				ps = append(ps, p)
			}
		}
	}
	return ev, re.ID, ps
}
