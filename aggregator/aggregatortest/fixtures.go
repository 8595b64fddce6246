package aggregatortest

import (
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/ingest"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Meters is one meter of every aggregation, with group-by dimensions,
// filters (one negated) and three event types between them, each type with
// more than one meter.
func Meters() []meter.Meter {
	return []meter.Meter{
		meter.Default(),
		{Key: "bytes_out", EventType: "api_call", Aggregation: meter.Sum, Value: "response_bytes", GroupBy: []string{"route", "status"}},
		{Key: "units_by_model", EventType: "tokens", Aggregation: meter.Sum, Value: "units", GroupBy: []string{"dimensions.model"},
			Filters: []meter.Filter{{Property: "dimensions.model", Values: []string{"banned"}, Not: true}}},
		{Key: "active_users", EventType: "api_call", Aggregation: meter.UniqueCount, Value: "dimensions.user", GroupBy: []string{"route"}},
		{Key: "peak_latency", EventType: "api_call", Aggregation: meter.Max, Value: "latency_us"},
		{Key: "balance", EventType: "balance", Aggregation: meter.Latest, Value: "dimensions.amount", GroupBy: []string{"dimensions.wallet"}},
		// Second meters on two event types, so the meters of each type share
		// a scan (a LATEST among them), one filter passing rows the other's
		// refuses.
		{Key: "balance_updates", EventType: "balance", Aggregation: meter.Count},
		// SUM and MAX over a dimension that is sometimes missing or not a
		// whole number, with negative values.
		{Key: "amount_total", EventType: "balance", Aggregation: meter.Sum, Value: "dimensions.amount"},
		{Key: "amount_peak", EventType: "balance", Aggregation: meter.Max, Value: "dimensions.amount", GroupBy: []string{"dimensions.wallet"}},
		{Key: "large_tokens", EventType: "tokens", Aggregation: meter.Sum, Value: "units",
			Filters: []meter.Filter{{Property: "dimensions.model", Values: []string{"large"}}}},
		// A filter on a column no other meter of its type reads: ClickHouse
		// 18.16 could not see such a column inside the scan's lambda.
		{Key: "writes", EventType: "api_call", Aggregation: meter.Count,
			Filters: []meter.Filter{{Property: "method", Values: []string{"POST", "PUT"}}}},
	}
}

// Accounts are the accounts GenEvents spreads events over.
var Accounts = []string{"acct_utc", "acct_tokyo", "acct_kolkata"}

// Zones puts two of Accounts in zones a whole and a half hour off UTC.
func Zones() aggregator.StaticZones {
	return aggregator.StaticZones{"acct_tokyo": "Asia/Tokyo", "acct_kolkata": "Asia/Kolkata"}
}

// GenEvents makes n events of Meters' event types over the 40 days before
// base, so month and day boundaries in every zone are crossed: live and test
// environments, dimensions for every group-by, and LATEST ties broken by id.
func GenEvents(rng *rand.Rand, n int, base time.Time) []schemas.Event {
	routes := []string{"/v1/a", "/v1/b", "/v1/c"}
	out := make([]schemas.Event, 0, n)
	for i := 0; i < n; i++ {
		e := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: Accounts[rng.IntN(len(Accounts))],
			Environment: schemas.Live, KeyID: "key_1", Type: "api_call", Units: 1,
			Time:  base.Add(-time.Duration(rng.Int64N(int64(40 * 24 * time.Hour)))).Truncate(time.Microsecond),
			Route: routes[rng.IntN(len(routes))], Method: []string{"GET", "GET", "POST"}[rng.IntN(3)], Status: []int{200, 404}[rng.IntN(2)],
			LatencyMicros: rng.Int64N(100000), ResponseBytes: rng.Int64N(5000),
			Dimensions: map[string]string{"user": fmt.Sprint("u", rng.IntN(20))}}
		if rng.IntN(10) == 0 {
			delete(e.Dimensions, "user") // not one more user for UNIQUE_COUNT
		}
		if rng.IntN(5) == 0 {
			e.Environment = schemas.Test
		}
		switch rng.IntN(6) {
		case 0:
			e.Type, e.Units = "tokens", rng.Int64N(1000)
			e.Dimensions = map[string]string{"model": []string{"small", "large", "banned"}[rng.IntN(3)]}
		case 1:
			e.Type = "balance"
			e.Dimensions = map[string]string{"wallet": fmt.Sprint("w", rng.IntN(3)), "amount": fmt.Sprint(rng.IntN(10000) - 5000)}
			// Values SUM, MAX and LATEST skip: missing, a fraction, too
			// long for an Int64, and not a number.
			switch rng.IntN(12) {
			case 0:
				delete(e.Dimensions, "amount")
			case 1:
				e.Dimensions["amount"] = "12.5"
			case 2:
				e.Dimensions["amount"] = "18446744073709551615"
			case 3:
				e.Dimensions["amount"] = "--5"
			}
			if rng.IntN(4) == 0 && len(out) > 0 {
				// Same microsecond as an earlier event: LATEST must break the tie by id.
				e.Time = out[len(out)-1].Time
			}
		}
		out = append(out, e)
	}
	return out
}

// Records wraps events as ingest records at offsets 0, 1, 2, ….
func Records(evs []schemas.Event) []ingest.Record {
	out := make([]ingest.Record, len(evs))
	for i, e := range evs {
		out[i] = ingest.Record{Event: e, Offset: int64(i)}
	}
	return out
}
