package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
)

// IngestMain runs ingest: Kafka usage topic to ClickHouse raw events.
type IngestMain struct {
	log *slog.Logger
	ch  driver.Conn
	src *ingestkafka.Source
	dlq *ingestkafka.DeadLetters
	in  *ingest.Ingester
}

// NewIngestMain connects to ClickHouse and joins the consumer group.
func NewIngestMain(ctx context.Context, cfg Config, log *slog.Logger) (*IngestMain, error) {
	log = log.With("component", "ingest")
	ch, err := openClickHouse(ctx, cfg.Services.ClickHouseAddr, cfg.Services.ClickHouseDatabase)
	if err != nil {
		return nil, err
	}
	if err := ensureTopics(ctx, cfg.Services.KafkaBrokers, 4, cfg.Ingest.Topic, cfg.Ingest.DeadLetter); err != nil {
		ch.Close()
		return nil, err
	}
	src := ingestkafka.NewSource(cfg.Services.KafkaBrokers, cfg.Ingest.Topic, cfg.Ingest.Group)
	dlq := ingestkafka.NewDeadLetters(cfg.Services.KafkaBrokers, cfg.Ingest.DeadLetter, cfg.Ingest.Topic)
	in, err := ingest.New(cfg.Ingest, src, chsink.NewSink(ch), dlq, log)
	if err != nil {
		src.Close()
		dlq.Close()
		ch.Close()
		return nil, err
	}
	return &IngestMain{log: log, ch: ch, src: src, dlq: dlq, in: in}, nil
}

// Run consumes until ctx ends.
func (m *IngestMain) Run(ctx context.Context) error {
	m.log.Info("ingest running")
	return m.in.Run(ctx)
}

// Close leaves the consumer group and closes connections.
func (m *IngestMain) Close() error {
	return errors.Join(m.src.Close(), m.dlq.Close(), m.ch.Close())
}
