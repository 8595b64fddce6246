package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggch "github.com/tollgate-dev/tollgate/aggregator/clickhouse"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
)

// IngestMain runs ingest: Kafka usage topic to ClickHouse raw events, with
// the rollups of every batch recomputed before its offsets are committed.
type IngestMain struct {
	log      *slog.Logger
	ch       driver.Conn
	pool     *pgxpool.Pool
	srcs     []*ingestkafka.Source
	dlq      *ingestkafka.DeadLetters
	in       *ingest.Ingester
	wm       *ingest.Watermarker
	rollups  *aggregator.Coalescer
	shared   *ingest.SharedSink
	metrics  *http.Server
	mln      net.Listener
	Registry *prometheus.Registry
}

// NewIngestMain connects to ClickHouse and Postgres and joins the consumer
// group with cfg.Ingest.Workers members.
func NewIngestMain(ctx context.Context, cfg Config, log *slog.Logger) (m *IngestMain, err error) {
	log = log.With("component", "ingest")
	m = &IngestMain{log: log, Registry: prometheus.NewRegistry()}
	self := m
	defer func() {
		if err != nil {
			_ = self.Close()
		}
	}()
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if m.ch, err = openClickHouse(ctx, cfg.Services, cfg.Services.ClickHouseDatabase); err != nil {
		return nil, err
	}
	if m.pool, err = openPostgres(ctx, cfg.Services.PostgresURL); err != nil {
		return nil, err
	}
	kc, err := cfg.Services.kafkaCluster()
	if err != nil {
		return nil, err
	}
	// The dead-letter topic takes larger messages than the usage topic:
	// a rejected record keeps its bytes and gains headers.
	if err = ensureTopicConfigs(ctx, kc,
		kafka.TopicConfig{Topic: cfg.Ingest.Topic, NumPartitions: 4, ReplicationFactor: brokerDefault},
		ingestkafka.DeadLetterTopic(cfg.Ingest.DeadLetter, 4)); err != nil {
		return nil, err
	}
	catalog, err := aggregator.NewCatalog(cfg.Meters, aggpg.NewMeters(m.pool), cfg.Aggregator.MetersRefresh, log)
	if err != nil {
		return nil, err
	}
	// Rollups wait for Postgres rather than roll up with a meter list
	// older than a new meter's backfill allows for.
	catalog.RequireFresh()
	m.rollups = aggregator.NewCoalescer(aggregator.NewRoller(catalog, aggpg.NewZones(m.pool, cfg.Aggregator.ZoneCacheTTL, log), aggch.NewStore(m.ch), log))
	sources := make([]ingest.Source, cfg.Ingest.Workers)
	for i := range sources {
		s := ingestkafka.NewSource(kc.brokers, kc.sec, cfg.Ingest.Topic, cfg.Ingest.Group)
		m.srcs = append(m.srcs, s)
		sources[i] = s
	}
	m.dlq = ingestkafka.NewDeadLetters(kc.brokers, kc.sec, cfg.Ingest.DeadLetter, cfg.Ingest.Topic)
	sink := chsink.NewSink(m.ch)
	m.shared = ingest.NewSharedSink(sink)
	prog := ingest.NewProgress()
	if m.in, err = ingest.New(cfg.Ingest, ingest.Deps{Sources: sources, Sink: m.shared, DeadLetters: m.dlq, Rollups: m.rollups,
		Log: log, Registry: m.Registry, Progress: prog}); err != nil {
		return nil, err
	}
	offsets := ingestkafka.NewOffsets(kc.brokers, kc.sec, cfg.Ingest.Topic, cfg.Ingest.Group)
	if m.wm, err = ingest.NewWatermarker(cfg.Ingest, offsets, sink, prog, log, m.Registry); err != nil {
		return nil, err
	}
	if cfg.Ingest.MetricsListen != "" {
		if m.mln, m.metrics, err = metricsServer(cfg.Ingest.MetricsListen, m.Registry,
			readiness(kafkaDep(kc), clickhouseDep(m.ch), postgresDep(m.pool)), log); err != nil {
			return nil, fmt.Errorf("ingest metrics listener: %w", err)
		}
	}
	return m, nil
}

// MetricsAddr is the metrics listener's address ("" without one).
func (m *IngestMain) MetricsAddr() string {
	if m.mln == nil {
		return ""
	}
	return m.mln.Addr().String()
}

// Run consumes until ctx ends.
func (m *IngestMain) Run(ctx context.Context) error {
	m.log.Info("ingest running", "workers", len(m.srcs))
	if m.metrics != nil {
		go func() {
			if err := m.metrics.Serve(m.mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				m.log.Error("ingest metrics server", "err", err)
			}
		}()
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = m.wm.Run(wctx) }()
	return m.in.Run(ctx)
}

// Close leaves the consumer group and closes connections.
func (m *IngestMain) Close() error {
	var errs []error
	if m.metrics != nil {
		errs = append(errs, m.metrics.Close())
	}
	for _, s := range m.srcs {
		errs = append(errs, s.Close())
	}
	if m.dlq != nil {
		errs = append(errs, m.dlq.Close())
	}
	if m.rollups != nil {
		errs = append(errs, m.rollups.Close())
	}
	if m.shared != nil {
		errs = append(errs, m.shared.Close())
	}
	if m.ch != nil {
		errs = append(errs, m.ch.Close())
	}
	if m.pool != nil {
		m.pool.Close()
	}
	return errors.Join(errs...)
}
