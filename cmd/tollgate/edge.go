package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/aggregator"
	aggpg "github.com/tollgate-dev/tollgate/aggregator/postgres"
	"github.com/tollgate-dev/tollgate/edge"
	edgefast "github.com/tollgate-dev/tollgate/edge/fasthttp"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
)

// EdgeMain runs the edge: the public listener, the admin listener, the key
// store and its change listener, the Redis limiter, the failed-auth audit
// writer and the event producer with its spool.
type EdgeMain struct {
	log     *slog.Logger
	pool    *pgxpool.Pool
	rdb     *redis.Client
	limiter *edgeredis.Limiter
	// fallback is the limiter the edge asks: Redis, else the local one.
	fallback *edge.FallbackLimiter
	producer *edgekafka.Producer
	auditor  *edgepg.AuditWriter
	listener *edgepg.Listener
	stopLn   context.CancelFunc
	// The spool's hold on usage is stored until holdsDone closes.
	stopHolds context.CancelFunc
	holdsDone chan struct{}
	ln        net.Listener
	front     *edgefast.Front
	adminLn   net.Listener
	adminSrv  *http.Server
	// Registry holds the edge's metrics (served on the admin listener).
	Registry *prometheus.Registry
}

// NewEdgeMain connects to Postgres, Redis and Kafka and binds the
// listeners, so Addr is known (port 0 picks a free one) before Run. Kafka
// being down does not stop the edge: events are spooled until it is back.
func NewEdgeMain(ctx context.Context, cfg Config, log *slog.Logger) (m *EdgeMain, err error) {
	log = log.With("component", "edge")
	m = &EdgeMain{log: log, Registry: prometheus.NewRegistry()}
	// Every failing return sets m to nil; the half-built edge is closed
	// through its own pointer.
	self := m
	defer func() {
		if err != nil {
			_ = self.Close()
		}
	}()
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if m.pool, err = openPostgres(ctx, cfg.Services.PostgresURL); err != nil {
		return nil, err
	}
	kc, err := cfg.Services.kafkaCluster()
	if err != nil {
		return nil, err
	}
	if err := ensureTopics(ctx, kc, 4, cfg.Ingest.Topic); err != nil {
		log.Warn("kafka is not reachable; events are spooled until it is", "err", err)
	}
	spoolDir := cfg.Edge.SpoolDir
	if spoolDir == "" {
		// The spool must outlive the process: no quiet fall back to the
		// temporary directory, often a tmpfs, or one a service manager
		// deletes when the service stops (PrivateTmp), which lost the
		// events spooled while Kafka was away.
		base, err := os.UserCacheDir()
		if err != nil {
			return nil, fmt.Errorf("edge.spool_dir is not set and there is no user cache directory to put the spool in (%v): "+
				"set edge.spool_dir (or TOLLGATE_EDGE_SPOOL_DIR) to a directory that survives restarts", err)
		}
		spoolDir = filepath.Join(base, "tollgate", "edge-spool", cfg.Ingest.Topic)
	}
	if m.producer, err = edgekafka.NewProducer(edgekafka.Config{
		Brokers: kc.brokers, Security: kc.sec, Topic: cfg.Ingest.Topic, SpoolDir: spoolDir, Linger: cfg.Edge.EventLinger,
		QueueSize: cfg.Edge.EventQueueSize, SpoolMaxBytes: cfg.Edge.SpoolMaxBytes,
	}, m.Registry, log); err != nil {
		// Opening the spool is all that can fail here: say which setting.
		return nil, fmt.Errorf("edge.spool_dir (or TOLLGATE_EDGE_SPOOL_DIR) %s: %w", spoolDir, err)
	}
	// While events wait in the spool, the invoicer must not close their
	// period. The hold is named by the spool's own id, which an edge back
	// on the same spool under another host name (a recreated container)
	// shares, so it releases the hold its predecessor left.
	host, _ := os.Hostname()
	if abs, err := filepath.Abs(spoolDir); err == nil {
		spoolDir = abs
	}
	instance := edgepg.Instance(m.producer.SpoolID())
	log.Info("spool", "dir", spoolDir, "host", host, "hold_instance", instance)
	holds := edgepg.NewHoldWriter(m.pool, instance, m.producer.SpoolHold, log)
	holds.OnStored(m.producer.HoldStored)
	hctx, stopHolds := context.WithCancel(context.Background())
	m.stopHolds, m.holdsDone = stopHolds, make(chan struct{})
	go func() { defer close(m.holdsDone); holds.Run(hctx, 500*time.Millisecond) }()
	store := edgepg.NewKeyStore(m.pool)
	cache := edge.NewKeyCache(store, cfg.Edge.KeyCacheTTL)
	cache.SetLookupTimeout(cfg.Edge.KeyLookupTimeout)
	m.listener = edgepg.NewListener(cfg.Services.PostgresURL, cache, log)
	lctx, stopLn := context.WithCancel(context.Background())
	m.stopLn = stopLn
	if err := m.listener.Start(lctx); err != nil {
		return nil, err
	}
	redisTLS, err := cfg.Services.redisTLS()
	if err != nil {
		return nil, err
	}
	m.rdb = redis.NewClient(&redis.Options{
		Addr:          cfg.Services.RedisAddr,
		TLSConfig:     redisTLS,
		Username:      cfg.Services.RedisUsername,
		Password:      cfg.Services.RedisPassword,
		DialTimeout:   250 * time.Millisecond,
		ReadTimeout:   250 * time.Millisecond,
		WriteTimeout:  250 * time.Millisecond,
		MaxRetries:    -1, // the local fallback is the retry
		DialerRetries: 1,
		PoolSize:      256,
	})
	fallbacks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tollgate_edge_limiter_fallbacks_total",
		Help: "Rate-limit and quota decisions made locally because Redis failed.",
	}, []string{"what"})
	m.Registry.MustRegister(fallbacks)
	m.limiter = edgeredis.NewLimiter(m.rdb)
	m.Registry.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_limit_leased_calls_total",
			Help: "Calls whose rate limits and quota were decided from tokens this instance had leased from Redis, without a round trip.",
		}, func() float64 { n, _ := m.limiter.Leased(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_limit_tokens_returned_total",
			Help: "Leased rate-limit and quota tokens given back to Redis unused.",
		}, func() float64 { _, n := m.limiter.Leased(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tollgate_edge_limit_token_return_errors_total",
			Help: "Failed attempts to give leased tokens back to Redis; their tokens stay counted.",
		}, func() float64 { return float64(m.limiter.ReturnErrors()) }),
	)
	// A Redis the edge cannot reach (a wrong redis_addr, say) is said at
	// start and at most once a minute while it lasts: the edge runs on,
	// deciding limits and quotas per instance, which the fleet's numbers
	// alone would not show.
	pctx, cancelPing := context.WithTimeout(context.Background(), time.Second)
	if err := m.rdb.Ping(pctx).Err(); err != nil {
		log.Warn("redis is not answering; rate limits and quotas are decided by each edge alone (limit / edge.expected_instances) until it does",
			"redis_addr", cfg.Services.RedisAddr, "err", err)
	}
	cancelPing()
	var warned atomic.Int64 // UnixNano of the last fallback warning
	m.fallback = &edge.FallbackLimiter{
		Primary: m.limiter,
		Local:   edge.NewLocalLimiter(cfg.Edge.ExpectedInstances),
		OnFallback: func(what string, err error) {
			fallbacks.WithLabelValues(what).Inc()
			if errors.Is(err, edge.ErrLimitState) {
				log.Warn("a call's rate-limit state in redis is unusable; that call is decided by the local fallback", "what", what, "err", err)
				return
			}
			if err != nil {
				if last := warned.Load(); time.Since(time.Unix(0, last)) >= time.Minute && warned.CompareAndSwap(last, time.Now().UnixNano()) {
					log.Warn("redis limiter failed; rate limits and quotas are decided by each edge alone (limit / edge.expected_instances) until it answers (said at most once a minute)",
						"redis_addr", cfg.Services.RedisAddr, "what", what, "err", err)
					return
				}
			}
			log.Debug("redis limiter failed; using the local fallback", "what", what, "err", err)
		},
	}
	if m.auditor, err = edgepg.NewAuditWriter(m.pool, time.Second, m.Registry, log); err != nil {
		return nil, err
	}
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tollgate_edge_key_cache_trusted", Help: "1 while key changes are being received and the key cache is in use.",
	}, func() float64 {
		if cache.Trusted() {
			return 1
		}
		return 0
	}))
	ready := func(ctx context.Context) error {
		// The listener notices a Postgres gone silent within about a
		// second, so it is asked first; the ping is bounded, as a probe
		// is: unbounded, it waited on a silent connection for as long as
		// the prober did, and left pgxpool's own ping holding the
		// connection for a minute, which held up the edge's stop.
		if !m.listener.Connected() {
			return errors.New("key change listener is not connected")
		}
		pctx, cancel := context.WithTimeout(ctx, readyPingTimeout)
		defer cancel()
		if err := m.pool.Ping(pctx); err != nil {
			return fmt.Errorf("postgres: %w", err)
		}
		if m.producer.Backed() {
			return errors.New("event producer: its queue is more than half full (kafka and the spool's disk refusing events?)")
		}
		return nil
	}
	// The meters in force, for POST /v1/events to warn of a type none
	// counts: the file's, and those created through the admin API, read
	// again every aggregator.meters_refresh.
	// A meters section the catalog refuses costs the warnings only: the
	// edge's own checks do not read it, and it must not stop the edge.
	var meters edge.MeterLister
	if catalog, err := aggregator.NewCatalog(cfg.Meters, aggpg.NewMeters(m.pool), cfg.Aggregator.MetersRefresh, log); err != nil {
		log.Warn("meters: the configuration's meters are refused; POST /v1/events does not warn of event types no meter counts", "err", err)
	} else {
		// A list the catalog cannot read again is not answered from
		// memory: the edge then warns of nothing rather than from a list
		// that may lack a meter created since.
		catalog.RequireFresh()
		meters = catalog
	}
	srv, err := edge.NewServer(cfg.Edge, edge.Deps{
		Keys: cache, Emitter: m.producer, Limiter: m.fallback, Quota: m.fallback, Auditor: m.auditor,
		Registry: m.Registry, Log: log, Ready: ready, Meters: meters,
	})
	if err != nil {
		return nil, err
	}
	if m.ln, err = net.Listen("tcp", cfg.Edge.Listen); err != nil {
		return nil, fmt.Errorf("edge listen: %w", err)
	}
	if m.front, err = edgefast.New(srv, log); err != nil {
		return nil, err
	}
	if cfg.Edge.AdminListen != "" {
		admin, err := edge.NewAdmin(cfg.Edge.AdminTokenSHA256, edge.AdminDeps{
			Store: store, Auditor: m.auditor, Gatherer: m.Registry, Log: log,
			Ready:  func(c echo.Context) error { return ready(c.Request().Context()) },
			Scopes: edge.KnownScopes(cfg.Edge.Routes),
		})
		if err != nil {
			return nil, err
		}
		if m.adminLn, err = net.Listen("tcp", cfg.Edge.AdminListen); err != nil {
			return nil, fmt.Errorf("edge admin listen: %w", err)
		}
		m.adminSrv = &http.Server{Handler: admin, ReadHeaderTimeout: 10 * time.Second}
	}
	return m, nil
}

// Addr is the address the edge listens on.
func (m *EdgeMain) Addr() string { return m.ln.Addr().String() }

// AdminAddr is the admin API's address, or "" when it is disabled.
func (m *EdgeMain) AdminAddr() string {
	if m.adminLn == nil {
		return ""
	}
	return m.adminLn.Addr().String()
}

// SpoolDepth is the number of events waiting in the spool.
func (m *EdgeMain) SpoolDepth() int64 { return m.producer.SpoolDepth() }

// Run serves until ctx ends, then stops accepting calls and drains those
// in flight.
func (m *EdgeMain) Run(ctx context.Context) error {
	errc := make(chan error, 2)
	go func() { errc <- m.front.Serve(m.ln) }()
	if m.adminSrv != nil {
		go func() { errc <- m.adminSrv.Serve(m.adminLn) }()
		m.log.Info("edge admin API listening", "addr", m.AdminAddr())
	}
	m.log.Info("edge listening", "addr", m.Addr())
	select {
	case err := <-errc:
		return fmt.Errorf("edge serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var errs []error
	if err := m.front.Shutdown(sctx); err != nil {
		errs = append(errs, fmt.Errorf("edge shutdown: %w", err))
	}
	if m.adminSrv != nil {
		if err := m.adminSrv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, fmt.Errorf("edge admin shutdown: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Close flushes every accepted event (to Kafka, or to the spool), writes
// pending audit rows and releases connections, in reverse start order.
func (m *EdgeMain) Close() error {
	var errs []error
	if m.front != nil {
		// Calls still running now (waiting for their upstream past the
		// graceful stop) have their events emitted only if they end
		// before the process exits: said, since nothing else can count
		// them.
		if n, _ := m.front.Close(); n > 0 {
			m.log.Warn("calls still in flight as the edge stops; their usage events are lost unless they end before it exits", "connections", n)
		}
	}
	if m.adminSrv != nil {
		_ = m.adminSrv.Close()
	} else if m.adminLn != nil {
		_ = m.adminLn.Close()
	}
	if m.limiter != nil {
		// Before the Redis client closes: refunds already in flight finish.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		errs = append(errs, m.limiter.ReturnLeases(ctx))
		cancel()
	}
	if m.fallback != nil {
		// The calls the local fallback allowed in an outage, into Redis's
		// month counts while its client is open; a Redis still down keeps
		// them (logged), as a stopped instance cannot.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := m.fallback.Settle(ctx); err != nil {
			m.log.Warn("the quota calls allowed while redis was down were not added to its counts", "err", err)
		}
		cancel()
	}
	if m.rdb != nil {
		errs = append(errs, m.rdb.Close())
	}
	if m.stopLn != nil {
		m.stopLn()
	}
	if m.producer != nil {
		errs = append(errs, m.producer.Close())
	}
	if m.stopHolds != nil {
		// After the producer's last drain, so a released hold is stored.
		m.stopHolds()
		<-m.holdsDone
	}
	if m.auditor != nil {
		// Last: usage events (money) and leases go first, and its final
		// flush, up to 10 s against a database that does not answer,
		// holds up nothing else.
		errs = append(errs, m.auditor.Close())
	}
	if m.pool != nil {
		m.pool.Close()
	}
	return errors.Join(errs...)
}
