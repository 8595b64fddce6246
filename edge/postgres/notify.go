package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/edge"
)

// Channel is the notification channel the api_keys and subscriptions
// triggers announce changes on (migration 00010).
const Channel = "tollgate_edge"

// Invalidator is what the listener drives: the edge's key cache.
type Invalidator interface {
	Invalidate(edge.Invalidation)
	SetTrusted(bool)
}

// Listener holds one connection LISTENing for key and plan changes and
// invalidates the cache on each. While it is disconnected the cache is
// untrusted (every lookup goes to the database), so no change can be
// missed; on reconnect the cache starts empty.
type Listener struct {
	url       string
	target    Invalidator
	log       *slog.Logger
	connected atomic.Bool
}

// NewListener returns a listener for the database at url.
func NewListener(url string, target Invalidator, log *slog.Logger) *Listener {
	return &Listener{url: url, target: target, log: log}
}

// Connected reports whether changes are being received.
func (l *Listener) Connected() bool { return l.connected.Load() }

// Start connects once (so a caller knows the cache is live) and keeps
// listening in the background until ctx ends.
func (l *Listener) Start(ctx context.Context) error {
	conn, err := l.connect(ctx)
	if err != nil {
		return err
	}
	go l.run(ctx, conn)
	return nil
}

// heartbeat is how long the listener waits for a notification before it
// checks, with a round trip bounded as long, that its connection still
// works: a connection whose peer vanished without closing it (a failover,
// a host gone) otherwise looks quiet for minutes while changes are missed,
// and the cache must stop being trusted within a second of that.
const heartbeat = 400 * time.Millisecond

func (l *Listener) connect(ctx context.Context) (*pgx.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// pgxpool's parser, as the pools' connections are made: it takes the
	// pool's own settings (pool_*) out of what is sent to the server.
	pcfg, err := pgxpool.ParseConfig(l.url)
	if err != nil {
		// Not the driver's message: it quotes the connection string, the
		// password masked only as best it can.
		return nil, errors.New("key change listener: the Postgres connection string does not parse; it is not shown, as it may hold a password")
	}
	cfg := pcfg.ConnConfig
	// A wait that ends at its deadline leaves the connection usable (the
	// default sends the server a cancel request, on a new connection, for
	// every heartbeat).
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.DeadlineContextWatcherHandler{Conn: pc.Conn()}
	}
	conn, err := pgx.ConnectConfig(cctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("key change listener: connect: %w", err)
	}
	if _, err := conn.Exec(cctx, "LISTEN "+Channel); err != nil {
		_ = conn.Close(context.Background())
		return nil, fmt.Errorf("key change listener: listen: %w", err)
	}
	l.target.SetTrusted(true)
	l.connected.Store(true)
	return conn, nil
}

func (l *Listener) run(ctx context.Context, conn *pgx.Conn) {
	backoff := 100 * time.Millisecond
	for {
		for conn != nil {
			wctx, cancel := context.WithTimeout(ctx, heartbeat)
			n, err := conn.WaitForNotification(wctx)
			quiet := err != nil && wctx.Err() != nil && ctx.Err() == nil
			cancel()
			if quiet {
				pctx, cancel := context.WithTimeout(ctx, heartbeat)
				err = conn.Ping(pctx)
				cancel()
				if err == nil {
					continue
				}
				err = fmt.Errorf("heartbeat: %w", err)
			}
			if err != nil {
				l.connected.Store(false)
				l.target.SetTrusted(false)
				_ = conn.Close(context.Background())
				conn = nil
				if ctx.Err() != nil {
					return
				}
				l.log.Warn("key change listener lost its connection; key cache disabled until it is back", "err", err)
				break
			}
			if inv, ok := edge.ParseInvalidation(n.Payload); ok {
				l.target.Invalidate(inv)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		var err error
		if conn, err = l.connect(ctx); err != nil {
			backoff = min(2*backoff, 5*time.Second)
			l.log.Warn("key change listener reconnect failed", "err", err)
			continue
		}
		backoff = 100 * time.Millisecond
		l.log.Info("key change listener reconnected; key cache enabled")
	}
}
