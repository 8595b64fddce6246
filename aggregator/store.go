package aggregator

import (
	"context"
	"time"

	"github.com/google/uuid"
)

// UsageQuery selects rollup rows of one meter for one account environment.
type UsageQuery struct {
	Account     string
	Environment string
	Meter       string
	Granularity Granularity
	From, To    time.Time
	// Grouped selects the meter's grouped rows instead of its totals.
	Grouped bool
	// Pick, when set with Grouped, keeps only these positions of the
	// meter's group_by and combines rows with Combine ("sum" or "max").
	Pick    []int
	Combine string
	Limit   int
	// After, when set, starts the page after this row (window start and
	// group values, the order rows come in): a page boundary that rows
	// landing between pages cannot shift.
	After *UsageRow
}

// UsageRow is one window (and group) of a meter.
type UsageRow struct {
	WindowStart time.Time
	Group       []string
	Value       int64
	Events      uint64
}

// RequestsQuery selects the recent raw events of one key.
type RequestsQuery struct {
	Account     string
	Environment string
	KeyID       string
	Since       time.Time
	// Before, when set, continues after the row with these coordinates.
	BeforeMicros uint64
	BeforeID     uuid.UUID
	BeforeType   string
	Limit        int
	// Now, when set (or Before), lets the store read newest first in
	// widening slices of time back from it (or from Before) and stop once
	// the page is full, instead of reading the whole range from Since.
	Now time.Time
}

// RequestRow is one raw event as the request log shows it.
type RequestRow struct {
	EventID       uuid.UUID `json:"event_id"`
	Time          time.Time `json:"time"`
	TimeMicros    uint64    `json:"-"`
	Type          string    `json:"type"`
	Route         string    `json:"route"`
	Method        string    `json:"method"`
	Status        uint16    `json:"status"`
	LatencyMicros uint64    `json:"latency_us"`
	RequestBytes  uint64    `json:"request_bytes"`
	ResponseBytes uint64    `json:"response_bytes"`
	Units         int64     `json:"units"`
	RequestID     string    `json:"request_id"`
}

// UsageStore reads what the usage API serves.
type UsageStore interface {
	// CheckZone tells whether windows can be computed in a zone; the
	// rollups of accounts in one it refuses are in UTC, and so is their
	// usage.
	ZoneChecker
	Usage(ctx context.Context, q UsageQuery) ([]UsageRow, error)
	Requests(ctx context.Context, q RequestsQuery) ([]RequestRow, error)
	// TooLate counts the account environment's events with event time in
	// [from, to) that arrived after the allowed lateness.
	TooLate(ctx context.Context, account, env string, from, to time.Time) (uint64, error)
	// CompleteThrough is the minimum partition watermark: every event
	// Kafka holds up to it has landed. Events still in an edge's spool are
	// not in Kafka; SpoolHolds covers them.
	CompleteThrough(ctx context.Context) (time.Time, bool, error)
}
