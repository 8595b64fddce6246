package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// PartitionOffsets is where the consumer group stands in one partition.
type PartitionOffsets struct {
	// Committed is the next offset the group will read (-1: none committed).
	Committed int64
	// End is the offset the next appended record will get.
	End int64
	// Start is the log start offset: the first record the partition still
	// holds (records before it were deleted by retention).
	Start int64
}

// Offsets reports the group's position in every partition of the topic.
type Offsets interface {
	Offsets(ctx context.Context) (map[int]PartitionOffsets, error)
}

// WatermarkStore keeps one watermark per partition (ClickHouse table
// `watermarks`, the contract with the invoicer).
type WatermarkStore interface {
	Watermarks(ctx context.Context) (map[int]time.Time, error)
	SetWatermarks(ctx context.Context, w map[int]time.Time, at time.Time) error
	// WatermarkSource is the usage topic and consumer group whose
	// progress the stored watermarks are ("", "" when none is recorded).
	WatermarkSource(ctx context.Context) (topic, group string, err error)
	// SetWatermarkSource records topic and group as the source.
	SetWatermarkSource(ctx context.Context, topic, group string, at time.Time) error
	// ResetWatermarks sets the watermark of each of partitions back to the
	// epoch and removes any other partition's.
	ResetWatermarks(ctx context.Context, partitions []int, at time.Time) error
}

type landedPos struct {
	offset int64
	time   time.Time
}

// Progress records the last record each partition landed in this process.
type Progress struct {
	mu   sync.Mutex
	last map[int]landedPos
}

// NewProgress returns an empty Progress.
func NewProgress() *Progress { return &Progress{last: map[int]landedPos{}} }

func (p *Progress) landed(msgs []Message) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range msgs {
		if cur, ok := p.last[m.Partition]; !ok || m.Offset > cur.offset {
			p.last[m.Partition] = landedPos{offset: m.Offset, time: m.Time}
		}
	}
}

func (p *Progress) get(partition int) (landedPos, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	l, ok := p.last[partition]
	return l, ok
}

// Watermarker publishes per-partition lag and watermarks.
//
// A partition's watermark is a time W such that every record appended to it
// with a timestamp at or before W has landed. When the group has committed
// everything up to the log end observed after time T, W = T - skew (the skew
// covers producers whose clocks run behind ours). Otherwise W is the
// timestamp of the last landed record minus skew, when this process landed
// it. Watermarks never move backwards.
type Watermarker struct {
	topic    string
	group    string
	owned    bool // this process has written under its topic and group
	offsets  Offsets
	store    WatermarkStore
	prog     *Progress
	skew     time.Duration
	interval time.Duration
	log      *slog.Logger
	now      func() time.Time
	lag      *prometheus.GaugeVec
	wmGauge  *prometheus.GaugeVec
	current  map[int]time.Time
	// expiredWarned: partitions whose unread, deleted records were logged.
	expiredWarned map[int]bool
}

// NewWatermarker returns a Watermarker; cfg must be defaulted.
func NewWatermarker(cfg Config, offsets Offsets, store WatermarkStore, prog *Progress, log *slog.Logger, reg prometheus.Registerer) (*Watermarker, error) {
	w := &Watermarker{topic: cfg.Topic, group: cfg.Group, offsets: offsets, store: store, prog: prog, skew: cfg.WatermarkSkew,
		interval: cfg.WatermarkInterval, log: log, now: time.Now, expiredWarned: map[int]bool{},
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tollgate_ingest_lag_records", Help: "Records appended to a partition and not yet landed.",
		}, []string{"partition"}),
		wmGauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tollgate_ingest_watermark_seconds", Help: "Per-partition watermark, Unix seconds.",
		}, []string{"partition"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{w.lag, w.wmGauge} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register watermark metrics: %w", err)
			}
		}
	}
	return w, nil
}

// Run refreshes lag and watermarks every interval until ctx ends. Failures
// are logged and retried on the next tick: a stale watermark only delays
// invoicing, it never makes usage wrong.
func (w *Watermarker) Run(ctx context.Context) error {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	var failingSince time.Time
	for {
		switch err := w.Tick(ctx); {
		case err == nil || ctx.Err() != nil:
			failingSince = time.Time{}
		case transient(err) && (failingSince.IsZero() || w.now().Sub(failingSince) < transientGrace):
			// A group coordinator still loading, or a partition between
			// leaders, answers with a retriable error for a moment after
			// a broker or topic starts; only a lasting one is news.
			if failingSince.IsZero() {
				failingSince = w.now()
			}
			w.log.Debug("refresh watermarks; retrying", "err", err)
		default:
			w.log.Warn("refresh watermarks", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Tick refreshes once.
func (w *Watermarker) Tick(ctx context.Context) error {
	// The stored watermarks are one topic's and group's progress, one row
	// per partition number: after ingest.topic or ingest.group changes,
	// the old topic's rows would stand for the new topic's partitions and
	// say usage is complete while its records wait to be read. A process
	// of another topic or group takes them over when it starts, from the
	// epoch; one that finds they were taken since writes no more.
	src, grp, err := w.store.WatermarkSource(ctx)
	if err != nil {
		return err
	}
	switch {
	case src == w.topic && grp == w.group:
	case src == "" && grp == "":
		// Nothing recorded: a new store, or one written before sources
		// were (by this topic, as an upgrade keeps it). Recorded below.
	case w.owned:
		return fmt.Errorf("the watermarks are now topic %s and group %s's, taken over by an ingest process started since; this process (topic %s, group %s) writes no more", src, grp, w.topic, w.group)
	default:
		offs, err := w.offsets.Offsets(ctx)
		if err != nil {
			return err
		}
		parts := slices.Sorted(maps.Keys(offs))
		// Reset first: a reset whose source was not recorded is done
		// again by the next tick; a source recorded first would leave the
		// old rows standing for good.
		if err := w.store.ResetWatermarks(ctx, parts, w.now()); err != nil {
			return err
		}
		if err := w.store.SetWatermarkSource(ctx, w.topic, w.group, w.now()); err != nil {
			return err
		}
		w.log.Warn("the watermarks were another usage topic's or consumer group's; they start again from the epoch for this one, so invoicing waits until it has caught up",
			"was_topic", src, "was_group", grp, "topic", w.topic, "group", w.group)
		w.current, src, grp = nil, w.topic, w.group
	}
	if w.current == nil {
		cur, err := w.store.Watermarks(ctx)
		if err != nil {
			return err
		}
		w.current = cur
	}
	t0 := w.now()
	offs, err := w.offsets.Offsets(ctx)
	if err != nil {
		return err
	}
	changed := map[int]time.Time{}
	for p, o := range offs {
		// A group that has committed nothing in a partition reads it from
		// its log start: records retention deleted before that are not
		// there to read, and do not hold the watermark at the epoch
		// forever (a partition that gets no new record would otherwise
		// keep every period open).
		// The same holds past a committed offset: retention may move the
		// log start beyond it, and the reader, finding nothing there,
		// commits nothing more until a new record comes (the lag stayed
		// above 0, and the watermark where it was, for good).
		from := max(o.Committed, 0)
		if o.Start > from && !w.expiredWarned[p] {
			w.expiredWarned[p] = true
			w.log.Warn("records were deleted by retention before this group read them; they were never ingested",
				"partition", p, "offsets", fmt.Sprintf("[%d, %d)", from, o.Start))
		}
		lag := o.End - max(from, o.Start)
		w.lag.WithLabelValues(partitionLabel(p)).Set(float64(lag))
		var wm time.Time
		switch {
		case lag <= 0:
			wm = t0.Add(-w.skew)
		default:
			if l, ok := w.prog.get(p); ok && l.offset+1 == o.Committed {
				// The record's time is its producer's clock: one running
				// ahead of this process's would put the watermark past
				// records not landed yet, for good (it never moves back).
				wm = l.time
				if wm.After(t0) {
					wm = t0
				}
				wm = wm.Add(-w.skew)
			}
		}
		wm = wm.UTC().Truncate(time.Second)
		if _, known := w.current[p]; !known && wm.IsZero() {
			// A partition behind, with nothing landed here yet, and no
			// row: without one, min(watermark) over the rows there are
			// would say its usage is complete. The epoch says it is not.
			wm = time.Unix(0, 0).UTC()
		}
		if wm.After(w.current[p]) {
			changed[p] = wm
		}
	}
	if len(changed) == 0 {
		return nil
	}
	// Another ingest process (the one given a partition in a rebalance)
	// may have written a later watermark since: read them again and never
	// write below what is stored.
	stored, err := w.store.Watermarks(ctx)
	if err != nil {
		return err
	}
	for p, wm := range changed {
		if s := stored[p]; !wm.After(s) {
			delete(changed, p)
			if s.After(w.current[p]) {
				w.current[p] = s
			}
		}
	}
	if len(changed) == 0 {
		return nil
	}
	if src == "" {
		if err := w.store.SetWatermarkSource(ctx, w.topic, w.group, w.now()); err != nil {
			return err
		}
	}
	if err := w.store.SetWatermarks(ctx, changed, w.now()); err != nil {
		return err
	}
	w.owned = true
	for p, wm := range changed {
		w.current[p] = wm
		w.wmGauge.WithLabelValues(partitionLabel(p)).Set(float64(wm.Unix()))
	}
	return nil
}

// transientGrace is how long retriable failures to refresh watermarks are
// logged at debug level before they are logged as warnings.
const transientGrace = 10 * time.Second

// transient reports whether err says to retry: a Kafka error such as "not
// coordinator for group" or "leader not available" (kafka-go's errors report
// it through Temporary).
func transient(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}
