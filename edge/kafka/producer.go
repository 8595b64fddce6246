// Package kafka delivers the edge's usage events to the Kafka usage topic,
// through a durable local spool whenever Kafka is unreachable.
package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Config configures a Producer.
type Config struct {
	Brokers []string
	// Security is how the brokers are reached: TLS and SASL (none when
	// zero).
	Security kafkaconn.Security
	Topic    string
	SpoolDir string
	// SpoolMaxBytes bounds the spool's files on disk (default 4 GiB, about
	// ten million events; negative: only the disk bounds them). A spool at
	// its bound takes no more: events wait in memory, as when the disk is
	// full, until Kafka takes them.
	SpoolMaxBytes int64
	// QueueSize bounds events held in memory; when it is full Emit waits
	// (counted in tollgate_edge_emit_waits_total) rather than drop.
	QueueSize int
	// BatchSize bounds one Kafka write and one spool group commit.
	BatchSize int
	// Linger is how long a write waits for more events before it is sent
	// (default 10 ms): at 1,000 calls/s, 10 ms makes produce requests of
	// about ten events instead of two or three.
	Linger time.Duration
	// WriteTimeout bounds one Kafka write; on timeout the batch is spooled.
	WriteTimeout time.Duration
	// CloseTimeout bounds how long Close takes to deliver or spool what is
	// queued and then drain the spool to Kafka; what is left in the spool
	// stays on disk for the next start, and queued events that neither the
	// disk nor Kafka took by then are counted lost.
	CloseTimeout time.Duration
}

// DefaultSpoolMaxBytes is Config.SpoolMaxBytes's default.
const DefaultSpoolMaxBytes = 4 << 30

func (c *Config) defaults() {
	if c.QueueSize == 0 {
		c.QueueSize = 65536
	}
	if c.SpoolMaxBytes == 0 {
		c.SpoolMaxBytes = DefaultSpoolMaxBytes
	}
	if c.BatchSize == 0 {
		c.BatchSize = 1000
	}
	if c.Linger == 0 {
		c.Linger = 10 * time.Millisecond
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 5 * time.Second
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = 15 * time.Second
	}
}

// Producer accepts events without blocking the response and delivers each
// to Kafka with acks from every in-sync replica, keyed by account id so an
// account's events keep their order on one partition.
//
// One goroutine owns delivery. While Kafka takes writes and the spool is
// empty, batches go straight to Kafka. When a write fails, that batch and
// every later one are appended to the spool (fsynced per batch), and the
// spool is drained to Kafka in order, with backoff, until it is empty again;
// only then do batches go direct again, so order is kept.
type Producer struct {
	cfg Config
	w   *kafka.Writer
	// transport is w's, closed with it: kafka-go's writer leaves a
	// transport it was given open.
	transport *kafka.Transport
	spool     *Spool
	log       *slog.Logger
	queue     chan kafka.Message
	done      chan struct{}
	once      sync.Once
	// mu orders Emit's send before Close closes the queue; closed is set
	// under it.
	mu     sync.RWMutex
	closed bool
	// late holds events emitted while closing, until Close spools them;
	// lateClosed is set once it has.
	lateMu     sync.Mutex
	late       [][]byte
	lateClosed bool

	// hold is the spool's claim on usage time, for SpoolHold.
	holdMu sync.Mutex
	hold   edge.SpoolHold
	// holdStored is the hold the hold store last said it stored.
	holdStored edge.SpoolHold
	// inHand is set while a batch neither the spool nor Kafka took waits
	// in memory (toSpool); armed and behind count down the events queued
	// when the hold could first be let go, which the trouble held back
	// too (release). The run goroutine's alone.
	inHand bool
	armed  bool
	behind int

	// closing is set once Close has begun; stopBy, written before it, is
	// when Close gives up.
	closing   atomic.Bool
	stopBy    time.Time
	nextTry   time.Time
	backoff   time.Duration
	kafkaUp   atomic.Bool
	retry     []kafka.Message
	retryCur  *SpoolCursor
	retryN    int
	produced  prometheus.Counter
	spooled   prometheus.Counter
	errs      prometheus.Counter
	waits     prometheus.Counter
	lost      prometheus.Counter
	collector []prometheus.Collector
}

var _ edge.Emitter = (*Producer)(nil)

// NewProducer opens the spool and starts delivering. Events left in the
// spool by an earlier run are delivered first.
func NewProducer(cfg Config, reg prometheus.Registerer, log *slog.Logger) (*Producer, error) {
	cfg.defaults()
	sp, err := OpenSpool(cfg.SpoolDir, log, cfg.SpoolMaxBytes)
	if err != nil {
		return nil, err
	}
	transport := cfg.Security.Transport()
	p := &Producer{
		cfg:       cfg,
		transport: transport,
		w: &kafka.Writer{
			Addr:                   kafka.TCP(cfg.Brokers...),
			Topic:                  cfg.Topic,
			Balancer:               &kafka.Hash{},
			RequiredAcks:           kafka.RequireAll,
			BatchSize:              cfg.BatchSize,
			BatchTimeout:           cfg.Linger,
			WriteTimeout:           cfg.WriteTimeout,
			ReadTimeout:            cfg.WriteTimeout,
			MaxAttempts:            1, // retries are ours, so we see every failure
			AllowAutoTopicCreation: false,
			Transport:              &topicMetadata{RoundTripper: transport},
		},
		spool: sp,
		log:   log,
		queue: make(chan kafka.Message, cfg.QueueSize),
		done:  make(chan struct{}),
		produced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_events_produced_total", Help: "Usage events acknowledged by Kafka.",
		}),
		spooled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_events_spooled_total", Help: "Usage events written to the local spool.",
		}),
		errs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_produce_errors_total", Help: "Failed Kafka writes (each batch counts once).",
		}),
		waits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_emit_waits_total", Help: "Emits that waited because the in-memory queue was full.",
		}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tollgate_edge_events_lost_total", Help: "Usage events emitted after the producer had closed (a call that outlived the graceful stop), that could not be spooled while it closed, or that were spooled and could not be read back (a corrupt record, a segment removed from the spool directory).",
		}),
	}
	p.kafkaUp.Store(true)
	p.collector = []prometheus.Collector{p.produced, p.spooled, p.errs, p.waits, p.lost,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tollgate_edge_spool_depth", Help: "Usage events in the local spool awaiting Kafka.",
		}, func() float64 { return float64(sp.Depth()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tollgate_edge_spool_bytes", Help: "Bytes the local spool's files hold on disk (bounded by edge.spool_max_bytes).",
		}, func() float64 { return float64(sp.Size()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tollgate_edge_emit_queue_length", Help: "Usage events in memory awaiting delivery.",
		}, func() float64 { return float64(len(p.queue)) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_spool_corrupt_regions_total", Help: "Corrupt regions of the spool skipped (each logged with its segment, offset and size); the events in them are not delivered.",
		}, func() float64 { return float64(sp.Corrupt()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_spool_corrupt_bytes_total", Help: "Bytes of the spool skipped in corrupt regions.",
		}, func() float64 { return float64(sp.CorruptBytes()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_spool_torn_tail_bytes_total", Help: "Bytes cut off the end of the spool's segment being written when it opened: a write a crash cut short, or records damaged there since (logged with segment and offset).",
		}, func() float64 { return float64(sp.TornTailBytes()) }),
	}
	if reg != nil {
		for _, c := range p.collector {
			if err := reg.Register(c); err != nil {
				_ = sp.Close()
				return nil, fmt.Errorf("register producer metrics: %w", err)
			}
		}
	}
	if d := sp.Depth(); d > 0 {
		log.Info("delivering events spooled by an earlier run", "events", d)
		// The hold starts at the oldest spooled event: server-reported
		// usage can be weeks old and anywhere in the spool, and a kill
		// can come before the earlier run's hold reached Postgres. The
		// hold store keeps that hold if it was older (SpoolHolds).
		since := time.Now()
		if t, ok := sp.Oldest(); ok && t.Before(since) {
			since = t
		}
		p.hold = edge.SpoolHold{Since: since}
	}
	go p.run()
	return p, nil
}

// Backed reports whether the in-memory queue is more than half full: the
// producer is not keeping up (Kafka out of reach and the disk refusing the
// spool, say), and calls are about to wait in Emit. /readyz says so, so a
// load balancer sends calls to another edge.
func (p *Producer) Backed() bool { return 2*len(p.queue) > cap(p.queue) }

// Emit queues ev for delivery. It does not wait for Kafka or the disk; it
// waits only if the in-memory queue is full. An event emitted while Close
// runs (a call that outlived the server's graceful stop) goes to the spool
// for the next start; one emitted after Close has returned is counted in
// tollgate_edge_events_lost_total and logged.
func (p *Producer) Emit(ev schemas.Event) {
	m := message(ev)
	p.mu.RLock()
	if !p.closed {
		select {
		case p.queue <- m:
		default:
			p.waits.Inc()
			p.queue <- m
		}
		p.mu.RUnlock()
		return
	}
	p.mu.RUnlock()
	p.lateMu.Lock()
	defer p.lateMu.Unlock()
	if p.lateClosed {
		p.lost.Inc()
		p.log.Error("usage event emitted after the producer closed; it is lost", "event_id", ev.ID, "account_id", ev.AccountID)
		return
	}
	p.late = append(p.late, m.Value)
}

// Lost counts the usage events emitted after Close had returned, or that
// could not be spooled while it ran (tollgate_edge_events_lost_total).
func (p *Producer) Lost() prometheus.Counter { return p.lost }

// SpoolID names the producer's spool (Spool.ID).
func (p *Producer) SpoolID() string { return p.spool.ID() }

// SpoolDepth is the number of events in the spool.
func (p *Producer) SpoolDepth() int64 { return p.spool.Depth() }

// KafkaUp reports whether the last Kafka write succeeded.
func (p *Producer) KafkaUp() bool { return p.kafkaUp.Load() }

func (p *Producer) run() {
	defer close(p.done)
	batch := make([]kafka.Message, 0, p.cfg.BatchSize)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	open := true
	for open {
		batch = batch[:0]
		select {
		case m, ok := <-p.queue:
			if !ok {
				open = false
				break
			}
			batch = append(batch, m)
		case <-tick.C:
		}
	fill:
		for open && len(batch) < cap(batch) {
			select {
			case m, ok := <-p.queue:
				if !ok {
					open = false
					break fill
				}
				batch = append(batch, m)
			default:
				break fill
			}
		}
		// A batch taken from the queue after the count began is one of
		// the events it counts (the queue is first in, first out).
		counted := p.armed
		p.deliver(batch)
		if counted && p.armed {
			p.behind -= len(batch)
		}
		if p.armed {
			p.release()
		}
		if !p.pastStop() {
			p.drain(10)
		}
	}
	// Closing: everything queued is delivered or spooled above; now give
	// the spool to Kafka until it is empty or the deadline passes.
	for p.spool.Depth() > 0 && time.Now().Before(p.stopBy) {
		if !p.drain(100) {
			time.Sleep(min(time.Until(p.stopBy), max(time.Until(p.nextTry), 10*time.Millisecond)))
		}
	}
	if d := p.spool.Depth(); d > 0 {
		p.log.Warn("stopping with events in the spool; they are delivered on the next start", "events", d, "dir", p.cfg.SpoolDir)
	}
}

// deliver writes batch to Kafka when the spool is empty and Kafka is not
// backing off, and spools whatever Kafka did not take.
func (p *Producer) deliver(batch []kafka.Message) {
	if len(batch) == 0 {
		return
	}
	if p.spool.Depth() == 0 && p.retry == nil && !time.Now().Before(p.nextTry) && !p.pastStop() {
		failed, err := p.write(batch)
		if err == nil {
			return
		}
		batch = failed
	}
	p.toSpool(batch)
}

// pastStop reports whether Close has run out of time: from then on, what
// is still queued goes to the spool if the disk takes it and is counted
// lost if not, with no more Kafka writes, each of which could wait out its
// timeout.
func (p *Producer) pastStop() bool {
	return p.closing.Load() && !time.Now().Before(p.stopBy)
}

func (p *Producer) toSpool(batch []kafka.Message) {
	defer func() { p.inHand = false }()
	for {
		recs := make([][]byte, len(batch))
		for i, m := range batch {
			recs[i] = m.Value
		}
		err := p.spool.Append(recs)
		if err == nil {
			p.spooled.Add(float64(len(recs)))
			p.held(recs)
			return
		}
		// Events of answered calls now wait in memory, in neither Kafka
		// nor the spool: the hold covers them (and the queue behind them,
		// all later), so no period closes without them, until they are
		// spooled or delivered (a drain meanwhile does not release it).
		p.inHand = true
		p.held(recs)
		// A graceful stop gives up on a disk that refuses every write and
		// a Kafka that takes nothing at its one deadline, not one per
		// batch: each batch left then counts as lost at once.
		if p.pastStop() {
			p.lost.Add(float64(len(batch)))
			p.log.Error("stopping with events neither spooled nor delivered; they are lost", "events", len(batch), "err", err)
			if p.spool.Depth() == 0 {
				p.released(time.Now()) // nothing it held will come
			}
			return
		}
		// Without the disk there is nowhere durable to put the events;
		// keep them in memory and retry rather than drop them. Meanwhile
		// Kafka may be back: draining the spool frees its disk, and once
		// it is empty this batch can go straight to Kafka, in order.
		p.log.Error("spool append failed; retrying", "events", len(recs), "err", err)
		p.drain(10)
		if p.spool.Depth() == 0 && p.retry == nil && !time.Now().Before(p.nextTry) {
			failed, err := p.write(batch)
			if err == nil {
				p.inHand = false
				p.release() // delivered, and the spool is empty
				return
			}
			batch = failed
		}
		wait := time.Second
		if p.closing.Load() {
			wait = min(wait, time.Until(p.stopBy))
		}
		time.Sleep(wait)
	}
}

// write sends batch and returns the messages Kafka did not take.
func (p *Producer) write(batch []kafka.Message) ([]kafka.Message, error) {
	// kafka-go times each produce request out after WriteTimeout, once its
	// batch has lingered, and then reports which messages failed. The
	// context only backstops that: were it as short, it could end the call
	// first, and the whole batch, acknowledged partitions included, would
	// be spooled and sent twice.
	ctx, cancel := context.WithTimeout(context.Background(), 2*p.cfg.WriteTimeout+p.cfg.Linger)
	defer cancel()
	err := p.w.WriteMessages(ctx, batch...)
	if err == nil {
		p.produced.Add(float64(len(batch)))
		p.kafkaUp.Store(true)
		p.backoff = 0
		return nil, nil
	}
	p.errs.Inc()
	p.kafkaUp.Store(false)
	p.backoff = min(max(2*p.backoff, 100*time.Millisecond), 5*time.Second)
	p.nextTry = time.Now().Add(p.backoff)
	var we kafka.WriteErrors
	if errors.As(err, &we) && len(we) == len(batch) {
		var failed []kafka.Message
		var first error
		for i, e := range we {
			if e != nil {
				failed = append(failed, batch[i])
				if first == nil {
					first = e
				}
			}
		}
		p.produced.Add(float64(len(batch) - len(failed)))
		// One line per failed write, with the first cause: the joined
		// error names every message.
		p.log.Warn("kafka write failed; spooling", "failed", len(failed), "of", len(batch), "retry_in", p.backoff, "err", first)
		return failed, err
	}
	p.log.Warn("kafka write failed; spooling", "events", len(batch), "retry_in", p.backoff, "err", err)
	return batch, err
}

// drain sends up to chunks batches from the spool to Kafka, in order. It
// reports whether it made progress. Past a graceful stop's deadline it
// starts no write: a slow Kafka that still answers took a write per batch
// left, so a stop overran its deadline by minutes.
func (p *Producer) drain(chunks int) bool {
	progress := false
	for i := 0; i < chunks && (p.spool.Depth() > 0 || p.retry != nil); i++ {
		if time.Now().Before(p.nextTry) || p.pastStop() {
			return progress
		}
		if p.retry == nil {
			recs, cur, err := p.spool.Read(p.cfg.BatchSize)
			if err != nil {
				p.log.Error("read spool", "err", err)
				p.nextTry = time.Now().Add(time.Second)
				return progress
			}
			if len(recs) == 0 {
				// Nothing readable: commit the cursor past a corrupt tail.
				// The spool is empty then, and its hold released. Events
				// it still counted are lost, and said so: their records
				// were corrupt (counted as corrupt regions too), or their
				// segment was removed from the spool directory by hand.
				if d := p.spool.Depth(); d > 0 {
					p.lost.Add(float64(d))
					p.log.Error("spool: usage events counted as spooled could not be read back; they are lost", "events", d)
				}
				_ = p.spool.Commit(cur, int(p.spool.Depth()))
				if p.spool.Drained() {
					p.release()
				}
				return progress
			}
			msgs := make([]kafka.Message, len(recs))
			for j, r := range recs {
				msgs[j] = kafka.Message{Key: accountKey(r), Value: r}
			}
			p.retry, p.retryCur, p.retryN = msgs, &cur, len(recs)
		}
		failed, err := p.write(p.retry)
		if err != nil {
			p.retry = failed
			return progress
		}
		if err := p.spool.Commit(*p.retryCur, p.retryN); err != nil {
			p.log.Error("commit spool cursor", "err", err)
		}
		p.retry, p.retryCur, p.retryN = nil, nil, 0
		progress = true
		if p.spool.Depth() == 0 {
			p.release()
		}
	}
	return progress
}

// HoldStored records that h is stored (by the hold store's writer): a
// released hold not yet stored is carried into the next one.
func (p *Producer) HoldStored(h edge.SpoolHold) {
	p.holdMu.Lock()
	p.holdStored = h
	p.holdMu.Unlock()
}

// SpoolHold reports the spool's claim on usage time (see edge.SpoolHold).
func (p *Producer) SpoolHold() edge.SpoolHold {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	return p.hold
}

// held widens the hold to the events of recs, just spooled; the first
// events spooled after a release start a new hold.
func (p *Producer) held(recs [][]byte) {
	now := time.Now()
	since := now
	for _, r := range recs {
		since = eventTime(r, since)
	}
	p.armed = false // new trouble: what is queued now waits for it too
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	if p.hold.Since.IsZero() || !p.hold.Released.IsZero() {
		// A new hold. A released one the watermark has not passed yet
		// is merged into it by the hold store (SpoolHolds.Hold), once
		// stored; one not yet stored (released between two syncs, or
		// while Postgres is away) keeps its since here: its events
		// reached Kafka late, and no row covered them.
		if !p.hold.Released.IsZero() && p.holdStored != p.hold && p.hold.Since.Before(since) {
			since = p.hold.Since
		}
		p.hold = edge.SpoolHold{Since: since}
	} else if since.Before(p.hold.Since) {
		p.hold.Since = since
	}
}

// release lets the hold go once nothing it covers waits: the spool is
// empty, no batch is in hand, and the events that were queued at that
// moment, emitted while the trouble held the queue back, have been
// delivered (run counts them down). Released as soon as the spool
// drained, it let a period close while those events were still on their
// way.
func (p *Producer) release() {
	if p.spool.Depth() > 0 || p.inHand || p.retry != nil {
		return
	}
	p.holdMu.Lock()
	holding := !p.hold.Since.IsZero() && p.hold.Released.IsZero()
	p.holdMu.Unlock()
	if !holding {
		p.armed = false
		return
	}
	if !p.armed {
		p.armed, p.behind = true, len(p.queue)
	}
	if p.behind > 0 {
		return
	}
	p.armed = false
	p.released(time.Now())
}

// released marks the hold released at t, when the spool has drained.
func (p *Producer) released(t time.Time) {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	if !p.hold.Since.IsZero() && p.hold.Released.IsZero() {
		p.hold.Released = t
	}
}

// eventTime is the earlier of the spooled event's time and before, read
// as the spool reads it when it opens (recordTime), without decoding the
// whole event on every batch spooled while Kafka is away.
func eventTime(rec []byte, before time.Time) time.Time {
	if t, ok := recordTime(rec); ok && t.Before(before) {
		return t
	}
	return before
}

func message(ev schemas.Event) kafka.Message {
	// The key (the account id) and the value share one allocation.
	n := len(ev.AccountID)
	buf := append(make([]byte, 0, n+384), ev.AccountID...)
	b, err := ev.AppendJSON(buf)
	if err != nil {
		// Events are built by the edge from typed fields; encoding cannot fail.
		b = append(buf, fmt.Sprintf(`{"error":%q}`, err)...)
	}
	return kafka.Message{Key: b[:n:n], Value: b[n:]}
}

// accountKey recovers the partition key of a spooled event.
func accountKey(value []byte) []byte {
	ev, err := schemas.Decode(value, time.Now().Add(24*time.Hour))
	if err != nil && ev.AccountID == "" {
		return nil
	}
	return []byte(ev.AccountID)
}

// Close stops accepting events, delivers everything queued (to Kafka, or
// to the spool), drains the spool to Kafka, all within CloseTimeout, and
// closes the connection. Events left in the spool are delivered on the next
// start.
func (p *Producer) Close() error {
	var errs []error
	p.once.Do(func() {
		p.stopBy = time.Now().Add(p.cfg.CloseTimeout)
		p.closing.Store(true)
		// Emits in flight finish their send first: the run loop keeps
		// taking from the queue until it is closed.
		p.mu.Lock()
		p.closed = true
		close(p.queue)
		p.mu.Unlock()
		<-p.done
		// Events emitted while closing: to the spool, for the next start.
		p.lateMu.Lock()
		late := p.late
		p.late, p.lateClosed = nil, true
		p.lateMu.Unlock()
		if len(late) > 0 {
			if err := p.spool.Append(late); err != nil {
				p.lost.Add(float64(len(late)))
				errs = append(errs, fmt.Errorf("spool events emitted while closing: %w", err))
			} else {
				p.spooled.Add(float64(len(late)))
				p.held(late)
				p.log.Warn("events emitted while closing are spooled for the next start", "events", len(late))
			}
		}
		errs = append(errs, p.w.Close(), p.spool.Close())
		p.transport.CloseIdleConnections()
	})
	<-p.done
	return errors.Join(errs...)
}
