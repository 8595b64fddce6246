// Package ingest lands usage events from Kafka in ClickHouse. It commits a
// Kafka offset only after ClickHouse holds every event before it, so a crash
// at any point means redelivery, never loss; duplicates that redelivery
// brings are absorbed downstream (see schemas/clickhouse).
package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/tollgate-dev/tollgate/schemas"
)

// Message is one record from the usage topic.
type Message struct {
	Partition int
	Offset    int64
	Key       []byte
	Value     []byte
	Time      time.Time
}

// Record is a decoded, valid event with where it came from.
type Record struct {
	Event     schemas.Event
	Partition int
	Offset    int64
}

// Source is the usage topic as a consumer group member sees it.
type Source interface {
	Fetch(ctx context.Context) (Message, error)
	Commit(ctx context.Context, msgs ...Message) error
}

// Sink stores a batch of records durably before returning.
type Sink interface {
	Insert(ctx context.Context, records []Record) error
}

// DeadLetters receives records that are not valid events, with the reason.
type DeadLetters interface {
	Reject(ctx context.Context, m Message, reason string) error
}

// Config is the ingest configuration.
type Config struct {
	Topic       string        `yaml:"topic"`
	DeadLetter  string        `yaml:"dead_letter_topic"`
	Group       string        `yaml:"group"`
	BatchSize   int           `yaml:"batch_size"`
	BatchWait   time.Duration `yaml:"batch_wait"`
	RetryPeriod time.Duration `yaml:"retry_period"`
}

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
	if c.BatchSize == 0 {
		c.BatchSize = 5000
	}
	if c.BatchWait == 0 {
		c.BatchWait = 200 * time.Millisecond
	}
	if c.RetryPeriod == 0 {
		c.RetryPeriod = time.Second
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Topic == "" {
		errs = append(errs, errors.New("ingest.topic: required"))
	}
	if c.DeadLetter == c.Topic {
		errs = append(errs, errors.New("ingest.dead_letter_topic: must differ from ingest.topic"))
	}
	if c.Group == "" {
		errs = append(errs, errors.New("ingest.group: required"))
	}
	if c.BatchSize <= 0 {
		errs = append(errs, errors.New("ingest.batch_size: must be positive"))
	}
	if c.BatchWait <= 0 {
		errs = append(errs, errors.New("ingest.batch_wait: must be positive"))
	}
	return errors.Join(errs...)
}

// Ingester moves batches from a Source to a Sink.
type Ingester struct {
	cfg  Config
	src  Source
	sink Sink
	dlq  DeadLetters
	log  *slog.Logger
	now  func() time.Time
}

// New returns an Ingester. cfg is defaulted and validated.
func New(cfg Config, src Source, sink Sink, dlq DeadLetters, log *slog.Logger) (*Ingester, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Ingester{cfg: cfg, src: src, sink: sink, dlq: dlq, log: log, now: time.Now}, nil
}

// Run consumes until ctx ends. A batch is flushed when it is full or when
// BatchWait has passed since its first message.
func (in *Ingester) Run(ctx context.Context) error {
	for {
		msgs, err := in.collect(ctx)
		if len(msgs) > 0 {
			if ferr := in.flush(ctx, msgs); ferr != nil {
				return ferr
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

func (in *Ingester) collect(ctx context.Context) ([]Message, error) {
	var msgs []Message
	m, err := in.src.Fetch(ctx)
	if err != nil {
		return nil, err
	}
	msgs = append(msgs, m)
	wctx, cancel := context.WithTimeout(ctx, in.cfg.BatchWait)
	defer cancel()
	for len(msgs) < in.cfg.BatchSize {
		m, err := in.src.Fetch(wctx)
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

// flush decodes, stores and commits one batch, retrying storage until it
// succeeds or ctx ends. Nothing is committed that is not stored.
func (in *Ingester) flush(ctx context.Context, msgs []Message) error {
	records := make([]Record, 0, len(msgs))
	now := in.now()
	for _, m := range msgs {
		ev, err := schemas.Decode(m.Value, now)
		if err != nil {
			if rerr := in.retry(ctx, "dead-letter", func(c context.Context) error { return in.dlq.Reject(c, m, err.Error()) }); rerr != nil {
				return rerr
			}
			continue
		}
		records = append(records, Record{Event: ev, Partition: m.Partition, Offset: m.Offset})
	}
	if len(records) > 0 {
		if err := in.retry(ctx, "insert", func(c context.Context) error { return in.sink.Insert(c, records) }); err != nil {
			return err
		}
	}
	return in.retry(ctx, "commit", func(c context.Context) error { return in.src.Commit(c, msgs...) })
}

func (in *Ingester) retry(ctx context.Context, what string, f func(context.Context) error) error {
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		in.log.Warn("ingest step failed, retrying", "step", what, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(in.cfg.RetryPeriod):
		}
	}
}
