package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/edge"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
)

// EdgeMain runs the edge: it owns the listener, the key store connection and
// the event producer.
type EdgeMain struct {
	log      *slog.Logger
	pool     *pgxpool.Pool
	producer *edgekafka.Producer
	ln       net.Listener
	srv      *http.Server
}

// NewEdgeMain connects to Postgres and Kafka and binds the listener, so
// Addr is known (port 0 picks a free one) before Run.
func NewEdgeMain(ctx context.Context, cfg Config, log *slog.Logger) (*EdgeMain, error) {
	log = log.With("component", "edge")
	pool, err := openPostgres(ctx, cfg.Services.PostgresURL)
	if err != nil {
		return nil, err
	}
	if err := ensureTopics(ctx, cfg.Services.KafkaBrokers, 4, cfg.Ingest.Topic); err != nil {
		pool.Close()
		return nil, err
	}
	producer := edgekafka.NewProducer(cfg.Services.KafkaBrokers, cfg.Ingest.Topic, log)
	srv, err := edge.NewServer(cfg.Edge, edgepg.NewKeyStore(pool), producer, log)
	if err != nil {
		producer.Close()
		pool.Close()
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Edge.Listen)
	if err != nil {
		producer.Close()
		pool.Close()
		return nil, fmt.Errorf("edge listen: %w", err)
	}
	return &EdgeMain{
		log:      log,
		pool:     pool,
		producer: producer,
		ln:       ln,
		srv:      &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second},
	}, nil
}

// Addr is the address the edge listens on.
func (m *EdgeMain) Addr() string { return m.ln.Addr().String() }

// Run serves until ctx ends, then stops accepting calls and drains those
// in flight.
func (m *EdgeMain) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- m.srv.Serve(m.ln) }()
	m.log.Info("edge listening", "addr", m.Addr())
	select {
	case err := <-errc:
		return fmt.Errorf("edge serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("edge shutdown: %w", err)
	}
	return nil
}

// Close flushes every accepted event to Kafka and releases connections.
func (m *EdgeMain) Close() error {
	_ = m.srv.Close()
	err := m.producer.Close()
	m.pool.Close()
	return err
}
