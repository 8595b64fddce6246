// Package ingest lands usage events from Kafka in ClickHouse, effectively
// once.
//
// The mechanism, and why it is correct (docs/ingest.md has the long form):
//
//  1. A batch's Kafka offsets are committed only after ClickHouse holds its
//     events, its too-late events and its recomputed rollups, and the
//     dead-letter topic holds its malformed records. A crash at any point
//     therefore means redelivery, never loss.
//  2. Redelivery, edge retries and client retries bring the same event (same
//     id, same bytes) more than once. The raw table is a ReplacingMergeTree
//     whose sorting key ends with the event id, and every exact read goes
//     through FINAL, so a physical duplicate is invisible to readers at once,
//     not only after a merge. The batch is also deduplicated in memory so
//     most duplicates never reach ClickHouse.
//  3. Rollups are never incremented. The Rollups hook recomputes every window
//     a batch touched from `usage_events FINAL` and writes the result again,
//     so recomputing after a redelivery yields the same row (see
//     schemas/clickhouse/0002_rollups.sql).
//  4. Dead letters are written at most once per source (partition, offset):
//     the DeadLetters implementation skips records it has already written,
//     so redelivery after a crash does not repeat them.
package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"

	"github.com/tollgate-dev/tollgate/schemas"
)

// Message is one record from the usage topic.
type Message struct {
	Partition int
	Offset    int64
	Key       []byte
	Value     []byte
	// Time is the record's Kafka timestamp: when the producer wrote it.
	Time time.Time
}

// Record is a decoded, valid event with where it came from.
type Record struct {
	Event     schemas.Event
	Partition int
	Offset    int64
	// RecordTime is the Kafka timestamp of the record that carried it.
	RecordTime time.Time
	// Value is the original bytes, kept for too-late events.
	Value []byte
	// dimKeys and dimValues are the event's dimensions as Split decodes
	// them: key-sorted arrays, the raw table's form, with
	// Event.Dimensions left nil (a map per event cost ingest about a
	// tenth of its CPU, only to be turned back into arrays).
	dimKeys, dimValues []string
}

// DimensionArrays returns the event's dimensions as key-sorted parallel
// arrays, whether Split decoded them or the event carries them as a map.
func (r *Record) DimensionArrays() (keys, values []string) {
	if r.Event.Dimensions == nil {
		return r.dimKeys, r.dimValues
	}
	return r.Event.DimensionArrays()
}

// Rejected is a record that is not a valid event, and why.
type Rejected struct {
	Message Message
	Reason  string
}

// MaxReasonBytes bounds a rejected record's reason, which its dead letter
// carries in a header: a reason quoting the record must never make the
// dead letter too large to write, which would stop the partition.
const MaxReasonBytes = 4 << 10

// Source is the usage topic as one consumer group member sees it.
type Source interface {
	Fetch(ctx context.Context) (Message, error)
	Commit(ctx context.Context, msgs ...Message) error
}

// Sink stores records durably before returning.
type Sink interface {
	// Insert writes valid, timely events to the raw events table, all
	// groups as one write (several workers' batches share one round).
	Insert(ctx context.Context, groups ...[]Record) error
	// InsertLate writes events that arrived after the allowed lateness
	// and returns those it wrote: a too-late copy of an event the raw
	// table already counts (same id, type and second) is a duplicate, and
	// is left out.
	InsertLate(ctx context.Context, records []Record) ([]Record, error)
}

// DeadLetters receives records that are not valid events, with the reason.
// An implementation writes each source (partition, offset) at most once,
// even when called again with the same records after a crash.
type DeadLetters interface {
	Reject(ctx context.Context, rs []Rejected) error
}

// Rollups is told about every batch of events that has landed, before its
// offsets are committed, and brings the windows they touch up to date. It
// must be idempotent: the same records may be passed again after a crash.
type Rollups interface {
	Landed(ctx context.Context, records []Record) error
}

// Config is the ingest configuration.
type Config struct {
	Topic      string `yaml:"topic"`
	DeadLetter string `yaml:"dead_letter_topic"`
	Group      string `yaml:"group"`
	// Workers is how many consumer group members this process runs; the
	// group spreads the topic's partitions over them, so partitions are
	// processed in parallel.
	Workers   int `yaml:"workers"`
	BatchSize int `yaml:"batch_size"`
	// MaxInFlight is how many batches a worker lands at once while it
	// collects the next; offsets are still committed strictly in order. A
	// batch lands when its day and month rollups are written, which lags
	// its raw rows and minute rollups by a few hundred milliseconds under
	// load; enough batches in flight keep the worker consuming meanwhile.
	// Once MaxInFlight are landing, the batch collected next lands too
	// while the worker waits to queue it: MaxInFlight+1 at most.
	MaxInFlight int `yaml:"max_in_flight"`
	// MaxInFlightRecords bounds the records of a worker's landing batches,
	// whatever their number: at a steady rate batches are small and
	// MaxInFlight of them keep the rollups' rounds fed, while a backlog
	// fills every batch and this bound keeps memory in check. A batch that
	// would pass it lands while the worker waits, as with MaxInFlight, so
	// a worker holds at most MaxInFlightRecords + BatchSize records. At
	// least BatchSize; default four full batches.
	MaxInFlightRecords int           `yaml:"max_in_flight_records"`
	BatchWait          time.Duration `yaml:"batch_wait"`
	RetryPeriod        time.Duration `yaml:"retry_period"`
	// MaxLateness is how far an event's time may lag its Kafka record time
	// and still count; older events are kept in late_events and reported.
	MaxLateness time.Duration `yaml:"max_lateness"`
	// WatermarkSkew is subtracted from landed record times when the
	// watermark advances, to allow for clock differences between producers.
	WatermarkSkew time.Duration `yaml:"watermark_skew"`
	// WatermarkInterval is how often lag and watermarks are refreshed.
	WatermarkInterval time.Duration `yaml:"watermark_interval"`
	// MetricsListen, when set, serves Prometheus metrics at /metrics.
	MetricsListen string `yaml:"metrics_listen"`
}

// DefaultMaxLateness is how late an event may be, as Stripe and Metronome allow.
const DefaultMaxLateness = 35 * 24 * time.Hour

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.Topic == "" {
		c.Topic = "tollgate.usage.v1"
	}
	if c.DeadLetter == "" {
		c.DeadLetter = c.Topic + ".dlq"
	}
	if c.Group == "" {
		c.Group = "tollgate-ingest"
	}
	if c.Workers == 0 {
		c.Workers = 4
	}
	if c.BatchSize == 0 {
		c.BatchSize = 40000
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 8
	}
	if c.MaxInFlightRecords == 0 && c.BatchSize > 0 {
		c.MaxInFlightRecords = 4 * c.BatchSize
	}
	if c.BatchWait == 0 {
		c.BatchWait = 100 * time.Millisecond
	}
	if c.RetryPeriod == 0 {
		c.RetryPeriod = time.Second
	}
	if c.MaxLateness == 0 {
		c.MaxLateness = DefaultMaxLateness
	}
	if c.WatermarkSkew == 0 {
		c.WatermarkSkew = 5 * time.Second
	}
	if c.WatermarkInterval == 0 {
		c.WatermarkInterval = time.Second
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Topic == "" {
		errs = append(errs, errors.New("ingest.topic: required"))
	}
	errs = append(errs, CheckTopic("ingest.topic", c.Topic), CheckTopic("ingest.dead_letter_topic", c.DeadLetter))
	if c.DeadLetter == c.Topic {
		errs = append(errs, errors.New("ingest.dead_letter_topic: must differ from ingest.topic"))
	}
	if c.Group == "" {
		errs = append(errs, errors.New("ingest.group: required"))
	}
	if c.Workers <= 0 || c.Workers > 256 {
		errs = append(errs, errors.New("ingest.workers: must be between 1 and 256"))
	}
	// A worker sets a full batch's room aside up front (about 90 bytes a
	// record), and holds max_in_flight_records: a typo in either took the
	// process down with the first record, the edge with it under
	// tollgate all.
	if c.BatchSize <= 0 || c.BatchSize > MaxBatchSize {
		errs = append(errs, fmt.Errorf("ingest.batch_size: must be between 1 and %d", MaxBatchSize))
	}
	if c.MaxInFlightRecords > 16*MaxBatchSize {
		errs = append(errs, fmt.Errorf("ingest.max_in_flight_records: at most %d", 16*MaxBatchSize))
	}
	if c.BatchWait <= 0 {
		errs = append(errs, errors.New("ingest.batch_wait: must be positive"))
	}
	if c.MaxInFlight <= 0 || c.MaxInFlight > 64 {
		errs = append(errs, errors.New("ingest.max_in_flight: must be between 1 and 64"))
	}
	if c.MaxInFlightRecords < c.BatchSize {
		errs = append(errs, errors.New("ingest.max_in_flight_records: must be at least ingest.batch_size, so that a full batch can land"))
	}
	if c.RetryPeriod <= 0 {
		errs = append(errs, errors.New("ingest.retry_period: must be positive"))
	}
	if c.MaxLateness < 2*time.Hour {
		// The edge takes server-reported events up to an hour old at
		// least (edge.max_event_age); ingest must count them with room to
		// spare for their trip to Kafka.
		errs = append(errs, errors.New("ingest.max_lateness: must be at least 2h"))
	}
	if c.WatermarkSkew < 0 {
		errs = append(errs, errors.New("ingest.watermark_skew: must not be negative"))
	}
	if c.WatermarkInterval <= 0 {
		errs = append(errs, errors.New("ingest.watermark_interval: must be positive"))
	}
	return errors.Join(errs...)
}

// MaxBatchSize bounds ingest.batch_size.
const MaxBatchSize = 1_000_000

// CheckTopic reports a topic name Kafka refuses (letters, digits, '.', '_'
// and '-', at most 249 of them, not "." or ".."); empty is not its to
// check. Such a name passed validation, and the edge then spooled every
// event for good, taking Kafka's "invalid topic" for an outage.
func CheckTopic(field, name string) error {
	if name == "" {
		return nil
	}
	if len(name) > 249 || name == "." || name == ".." ||
		strings.ContainsFunc(name, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-')
		}) {
		return fmt.Errorf("%s: %q is not a Kafka topic name (letters, digits, '.', '_' and '-', at most 249, not \".\" or \"..\")", field, name)
	}
	return nil
}

// Ingester moves batches from its Sources to the Sink, one goroutine per
// Source.
type Ingester struct {
	cfg     Config
	srcs    []Source
	sink    Sink
	dlq     DeadLetters
	rollups Rollups
	log     *slog.Logger
	now     func() time.Time
	m       *metrics
	prog    *Progress
}

// Deps are what an Ingester needs besides its configuration.
type Deps struct {
	// Sources are the consumer group members, one worker each.
	Sources     []Source
	Sink        Sink
	DeadLetters DeadLetters
	// Rollups may be nil: events then only land in the raw table.
	Rollups  Rollups
	Log      *slog.Logger
	Registry prometheus.Registerer
	// Progress may be nil; when set, it learns what each batch landed.
	Progress *Progress
}

// New returns an Ingester. cfg is defaulted and validated.
func New(cfg Config, d Deps) (*Ingester, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(d.Sources) == 0 || d.Sink == nil || d.DeadLetters == nil || d.Log == nil {
		return nil, errors.New("ingest: sources, sink, dead letters and logger are required")
	}
	m, err := newMetrics(d.Registry)
	if err != nil {
		return nil, err
	}
	return &Ingester{cfg: cfg, srcs: d.Sources, sink: d.Sink, dlq: d.DeadLetters, rollups: d.Rollups,
		log: d.Log, now: time.Now, m: m, prog: d.Progress}, nil
}

// Run consumes until ctx ends or a worker fails for good.
func (in *Ingester) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(in.srcs))
	for i, src := range in.srcs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := in.work(ctx, src); err != nil {
				errs[i] = fmt.Errorf("worker %d: %w", i, err)
				cancel()
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// batch is one collected batch on its way to ClickHouse.
type batch struct {
	// msgs is the last message of each partition the batch read: all the
	// commit and the watermark need. The others, with their bytes, are
	// let go once the batch is decoded, so a landing batch holds only its
	// decoded records.
	msgs []Message
	// records is how many messages the batch read: its weight against
	// MaxInFlightRecords.
	records int
	events  []Record
	late    []Record
	rej     int
	dups    int
	// lateDups is how many of late turned out to be copies of events
	// an earlier batch counted.
	lateDups int
	landed   chan error
	// inserted is closed once this batch's events, and every earlier
	// batch's of the worker, are in the raw table (or the worker is
	// stopping); after is the batch before's. A too-late copy is checked
	// against the raw table only then, so a copy whose first one is
	// still landing in an earlier batch is not taken for a late event.
	inserted chan struct{}
	after    <-chan struct{}
}

// work runs one consumer group member. Batches are collected, dead-lettered
// and handed to a landing goroutine one after another; up to MaxInFlight
// land at once while the next is collected, and a committer commits each
// batch's offsets only after it and every batch before it have landed.
// Dead letters are written in order, before the batch is handed on, which
// the exactly-once dead-letter check relies on.
func (in *Ingester) work(parent context.Context, src Source) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	queue := make(chan *batch, in.cfg.MaxInFlight-1)
	held := semaphore.NewWeighted(int64(in.cfg.MaxInFlightRecords))
	// A landed batch's records are decoded into again: a batch is tens of
	// megabytes, and fresh ones each time cost ingest a page fault per 4
	// KiB and the zeroing of every byte, about a tenth of its CPU.
	free := &recordBuffers{limit: in.cfg.MaxInFlightRecords}
	committed := make(chan error, 1)
	go func() {
		var err error
		for b := range queue {
			// Every batch is waited for, after a failure too (its landing
			// ends with ctx), so no landing outlives the worker.
			if lerr := <-b.landed; err == nil {
				err = lerr
			}
			if err == nil {
				err = in.retry(ctx, "commit", func(c context.Context) error { return src.Commit(c, b.msgs...) })
			}
			held.Release(int64(b.records))
			if err != nil {
				cancel()
				continue
			}
			// Landed: neither the sink nor the rollups hold the records
			// any longer (a round answers only once it is done with them).
			free.put(b.events)
			in.m.records.WithLabelValues("landed").Add(float64(len(b.events)))
			in.m.records.WithLabelValues("duplicate_in_batch").Add(float64(b.dups))
			in.m.records.WithLabelValues("too_late").Add(float64(len(b.late)))
			in.m.records.WithLabelValues("duplicate_too_late").Add(float64(b.lateDups))
			in.m.records.WithLabelValues("dead_letter").Add(float64(b.rej))
			if in.prog != nil {
				in.prog.landed(b.msgs)
			}
		}
		committed <- err
	}()
	var err error
	// The messages are let go once their batch is decoded, so one buffer
	// serves each batch in turn.
	msgs := make([]Message, 0, in.cfg.BatchSize)
	seen := make(map[idSecond]string) // grows to the largest batch's room
	prevInserted := make(chan struct{})
	close(prevInserted)
	for err == nil {
		msgs, err = in.collect(ctx, src, msgs[:0])
		if len(msgs) == 0 {
			continue
		}
		b, ferr := in.prepare(ctx, msgs, free.get(), seen)
		clear(msgs) // their bytes are the batch's records' now, or garbage
		if ferr != nil {
			err = ferr
			break
		}
		b.after, b.inserted = prevInserted, make(chan struct{})
		prevInserted = b.inserted
		go func() { b.landed <- in.land(ctx, b) }()
		// Both block while earlier batches land (b is the +1): while
		// MaxInFlight are landing, or while b's records would pass
		// MaxInFlightRecords. That is the backpressure.
		if err = held.Acquire(ctx, int64(b.records)); err != nil {
			<-b.landed // started above: the worker never returns while it lands
			break
		}
		queue <- b
	}
	close(queue)
	cerr := <-committed
	if parent.Err() != nil {
		return nil // stopping: what was not committed is redelivered
	}
	return errors.Join(err, cerr)
}

// recordBuffers keeps a worker's landed batches' record buffers for its
// next batches. Batches land together (one shared insert and rollup round
// serves several), so several buffers come back at once and are taken
// again one batch at a time: a queue of two kept too few, and batches
// decoded into fresh memory. The buffers kept have room for no more than
// limit (MaxInFlightRecords) records between them, so an idle worker holds
// no more than it may hold in flight, and batches too small to fill half a
// buffer let the buffers go one by one (splitInto).
type recordBuffers struct {
	mu      sync.Mutex
	bufs    [][]Record
	records int // the room of bufs, in records
	limit   int
}

// put keeps b, emptied, unless the buffers kept would then have room for
// more than limit records. Its records are zeroed, so a buffer kept while
// its worker idles holds no message bytes or strings of its last batch.
func (f *recordBuffers) put(b []Record) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.records+cap(b) <= f.limit {
		clear(b)
		f.bufs = append(f.bufs, b[:0])
		f.records += cap(b)
	}
}

// get returns a kept buffer, the one put last, or nil.
func (f *recordBuffers) get() []Record {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.bufs) == 0 {
		return nil
	}
	b := f.bufs[len(f.bufs)-1]
	f.bufs[len(f.bufs)-1] = nil
	f.bufs = f.bufs[:len(f.bufs)-1]
	f.records -= cap(b)
	return b
}

// collect blocks for the first message, then gathers more until the batch
// is full or BatchWait has passed since the first one. The worker collects
// while up to MaxInFlight earlier batches land; one more, already landing,
// then waits for a place in the queue and the worker stops fetching, so
// at most MaxInFlight+1 batches of a worker are held at once and a slow
// ClickHouse slows consumption instead of filling memory: that is the
// backpressure, and the lag metric shows it.
func (in *Ingester) collect(ctx context.Context, src Source, msgs []Message) ([]Message, error) {
	m, err := src.Fetch(ctx)
	for err != nil {
		// Kafka out of reach: kafka-go's reader hands the error back
		// after a few attempts ("to allow healing") and recovers by
		// itself once the broker is back. So the worker waits and fetches
		// again; returning would have stopped ingest within about 10 s of
		// an outage (and, under tollgate all, the edge with it). Only a
		// closed source or the end of ctx stops it.
		if ctx.Err() != nil || errors.Is(err, io.EOF) {
			return nil, err
		}
		in.m.retries.WithLabelValues("fetch").Inc()
		in.log.Warn("ingest step failed, retrying", "step", "fetch", "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(in.cfg.RetryPeriod):
		}
		m, err = src.Fetch(ctx)
	}
	msgs = append(msgs, m)
	wctx, cancel := context.WithTimeout(ctx, in.cfg.BatchWait)
	defer cancel()
	for len(msgs) < in.cfg.BatchSize {
		m, err := src.Fetch(wctx)
		if err != nil {
			if ctx.Err() != nil {
				return msgs, ctx.Err()
			}
			return msgs, nil
		}
		msgs = append(msgs, m)
	}
	return msgs, nil
}

// rowKey is what makes two events one row of the raw table, whose sorting
// key is (account, environment, type, time to the second, id); an id
// implies its account and environment. Split drops a second copy by this
// key, not by id alone: a client's retry with the same id but another time
// is two rows in ClickHouse, and were it one in a batch but two across
// batches, the count would hang on how the events were batched, and a
// replay (batched differently) would not match the ledger.
type rowKey struct {
	idSecond
	typ string
}

// idSecond is a row key without its type.
type idSecond struct {
	id     uuid.UUID
	second int64
}

// Split decodes a batch: valid and timely events (first copy of each row
// only), events beyond maxLateness, and rejected records. Both time checks
// (an event stamped too far in the future, or too late) are made against
// the record's Kafka timestamp, and against now only for a record without
// one, so a redelivered batch splits exactly as it did the first time,
// whichever ingest process and clock read it: an event is never both a
// dead letter and counted, nor landed in raw rows but not in rollups.
func Split(msgs []Message, now time.Time, maxLateness time.Duration) (events, late []Record, rejected []Rejected, dups int) {
	return splitInto(nil, nil, msgs, now, maxLateness, 0)
}

// roomFor is the records a new buffer for a batch of n has room for: a
// quarter more, up to batchSize (but never less than n).
func roomFor(n, batchSize int) int {
	return max(n, min(n+n/4, batchSize))
}

// splitInto is Split decoding into into's memory when it has room for
// every message and the batch fills at least half of it: a small batch in
// a large buffer would hold that memory while it lands, unweighed by
// MaxInFlightRecords (the buffer is dropped instead). A new buffer gets a
// quarter more room than its batch, up to batchSize, so the next batches
// of about its size fit in it once it is free: batches cut by BatchWait
// vary in size, and with room for only its own, a buffer fitted barely
// half of them, and every other batch took fresh memory.
//
// seen, when not nil, is an empty map splitInto uses and leaves empty: a
// worker's one map for all its batches keeps its room, where a new map
// per batch was megabytes of fresh memory each time.
func splitInto(into []Record, seen map[idSecond]string, msgs []Message, now time.Time, maxLateness time.Duration, batchSize int) (events, late []Record, rejected []Rejected, dups int) {
	// seen holds each kept row's type under its id and second: a key
	// without a string hashes and compares as one block of memory, and
	// that is most of a lookup's cost. The rare id and second seen with a
	// second type go to others, under the whole key.
	if seen == nil {
		seen = make(map[idSecond]string, len(msgs))
	}
	defer clear(seen)
	var others, lateSeen map[rowKey]struct{}
	if cap(into) >= len(msgs) && len(msgs) >= cap(into)/2 {
		events = into[:0]
	} else {
		events = make([]Record, 0, roomFor(len(msgs), batchSize))
	}
	var strs schemas.Interner
	for _, m := range msgs {
		at := now
		if !m.Time.IsZero() {
			at = m.Time
		}
		// Each event is decoded in place, in the slot after the last
		// kept one, and the slot is given back when the event is not
		// kept: a Record is a few hundred bytes, and copying each one
		// twice more cost ingest a tenth of its CPU.
		events = append(events, Record{})
		r := &events[len(events)-1]
		dk, dv, err := schemas.DecodeFlat(m.Value, at, &strs, &r.Event)
		if err != nil {
			events = events[:len(events)-1]
			rejected = append(rejected, Rejected{Message: m, Reason: schemas.Clip(err.Error(), MaxReasonBytes)})
			continue
		}
		r.Partition, r.Offset, r.RecordTime, r.dimKeys, r.dimValues = m.Partition, m.Offset, m.Time, dk, dv
		// Lateness is decided before duplicates, and a too-late copy is
		// never seen: an on-time copy of the same event later in the
		// batch must count, as it does when the two land in different
		// batches. A too-late copy of a counted event (in this batch or
		// an earlier one) is found as such when it lands (InsertLate).
		if !m.Time.IsZero() && r.Event.Time.Before(m.Time.Add(-maxLateness)) {
			events = events[:len(events)-1]
			// A second too-late copy in the batch is a duplicate, as a
			// second on-time copy is.
			full := rowKey{idSecond: idSecond{id: r.Event.ID, second: r.Event.Time.Unix()}, typ: r.Event.Type}
			if _, ok := lateSeen[full]; ok {
				dups++
				continue
			}
			if lateSeen == nil {
				lateSeen = map[rowKey]struct{}{}
			}
			lateSeen[full] = struct{}{}
			r.Value = m.Value
			late = append(late, *r)
			continue
		}
		k := idSecond{id: r.Event.ID, second: r.Event.Time.Unix()}
		typ, ok := seen[k]
		if !ok {
			seen[k] = r.Event.Type
		} else if typ == r.Event.Type {
			events = events[:len(events)-1]
			dups++
			continue
		} else {
			full := rowKey{idSecond: k, typ: r.Event.Type}
			if _, ok := others[full]; ok {
				events = events[:len(events)-1]
				dups++
				continue
			}
			if others == nil {
				others = map[rowKey]struct{}{}
			}
			others[full] = struct{}{}
		}
	}
	return events, late, rejected, dups
}

// prepare decodes a batch and writes its dead letters.
func (in *Ingester) prepare(ctx context.Context, msgs []Message, into []Record, seen map[idSecond]string) (*batch, error) {
	events, late, rejected, dups := splitInto(into, seen, msgs, in.now(), in.cfg.MaxLateness, in.cfg.BatchSize)
	in.m.batchSize.Observe(float64(len(msgs)))
	if len(rejected) > 0 {
		if err := in.retry(ctx, "dead-letter", func(c context.Context) error { return in.dlq.Reject(c, rejected) }); err != nil {
			return nil, err
		}
	}
	return &batch{msgs: lastOfEachPartition(msgs), records: len(msgs), events: events, late: late, rej: len(rejected),
		dups: dups, landed: make(chan error, 1)}, nil
}

// lastOfEachPartition returns, for each partition in msgs, its message with
// the highest offset, without its key and value.
func lastOfEachPartition(msgs []Message) []Message {
	var last []Message
	for _, m := range msgs {
		m.Key, m.Value = nil, nil
		i := slices.IndexFunc(last, func(l Message) bool { return l.Partition == m.Partition })
		switch {
		case i < 0:
			last = append(last, m)
		case m.Offset > last[i].Offset:
			last[i] = m
		}
	}
	return last
}

// land stores a batch's events and too-late events and recomputes the
// rollups it touches, retrying each step until it succeeds or ctx ends.
func (in *Ingester) land(ctx context.Context, b *batch) error {
	inserted := func() {
		if b.inserted == nil {
			return
		}
		go func() {
			select {
			case <-b.after:
			case <-ctx.Done():
			}
			close(b.inserted)
		}()
	}
	if len(b.events) > 0 {
		t := in.now()
		if err := in.retry(ctx, "insert", func(c context.Context) error { return in.sink.Insert(c, b.events) }); err != nil {
			inserted()
			return err
		}
		in.m.insertLatency.Observe(in.now().Sub(t).Seconds())
	}
	inserted()
	if len(b.late) > 0 {
		if b.after != nil {
			select {
			case <-b.after:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		n := len(b.late)
		if err := in.retry(ctx, "insert late", func(c context.Context) error {
			kept, err := in.sink.InsertLate(c, b.late)
			if err == nil {
				b.late = kept
			}
			return err
		}); err != nil {
			return err
		}
		b.lateDups = n - len(b.late)
		for _, r := range b.late {
			in.log.Warn("event arrived after the allowed lateness; kept in late_events, not counted",
				"event_id", r.Event.ID, "account_id", r.Event.AccountID, "event_time", r.Event.Time,
				"record_time", r.RecordTime, "max_lateness", in.cfg.MaxLateness)
		}
	}
	if in.rollups != nil && len(b.events) > 0 {
		t := in.now()
		if err := in.retry(ctx, "rollups", func(c context.Context) error { return in.rollups.Landed(c, b.events) }); err != nil {
			return err
		}
		in.m.rollupLatency.Observe(in.now().Sub(t).Seconds())
	}
	return nil
}

func (in *Ingester) retry(ctx context.Context, what string, f func(context.Context) error) error {
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", what, ctx.Err())
		}
		in.m.retries.WithLabelValues(what).Inc()
		in.log.Warn("ingest step failed, retrying", "step", what, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(in.cfg.RetryPeriod):
		}
	}
}

type metrics struct {
	batchSize     prometheus.Histogram
	insertLatency prometheus.Histogram
	rollupLatency prometheus.Histogram
	records       *prometheus.CounterVec
	retries       *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tollgate_ingest_batch_records", Help: "Records per flushed batch.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 9),
		}),
		insertLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tollgate_ingest_insert_seconds", Help: "Time to insert one batch into ClickHouse, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		rollupLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tollgate_ingest_rollup_seconds", Help: "Time to recompute the windows one batch touched.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		records: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_ingest_records_total",
			Help: "Records by outcome: landed, duplicate_in_batch, too_late, duplicate_too_late (a too-late copy of an event counted before), dead_letter.",
		}, []string{"outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_ingest_retries_total", Help: "Failed ingest steps that were retried.",
		}, []string{"step"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.batchSize, m.insertLatency, m.rollupLatency, m.records, m.retries} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register ingest metrics: %w", err)
			}
		}
	}
	return m, nil
}

// partitionLabel formats a partition number as a metric label.
func partitionLabel(p int) string { return strconv.Itoa(p) }
