package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
	edgefast "github.com/tollgate-dev/tollgate/edge/fasthttp"
	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	edgeredis "github.com/tollgate-dev/tollgate/edge/redis"
	"github.com/tollgate-dev/tollgate/schemas"
)

// freshEdge is an edge wired as `tollgate edge` wires one (hashed keys
// from Postgres behind the cache and its listener, limits in Redis, events
// to Kafka with the edge's defaults: RequireAll, its linger, its spool) in
// front of a tiny upstream, so freshness is timed from the call at the
// edge, as the issue defines it.
type freshEdge struct {
	addr string
	stop func()
}

// startFreshEdge starts the edge on topic for accounts, each subscribed to
// a plan whose limits no freshness run reaches, and returns a secret key
// per account.
func startFreshEdge(ctx context.Context, pool *pgxpool.Pool, brokers []string, topic string, accounts []string, log *slog.Logger) (*freshEdge, []string, error) {
	store := edgepg.NewKeyStore(pool)
	def, _ := json.Marshal(map[string]any{"limits": map[string]any{"requests_per_second": 10_000_000, "burst": 10_000_000, "monthly_requests": nil}})
	if _, err := pool.Exec(ctx, `INSERT INTO plans (id, version, name, currency, definition) VALUES ('bench_fresh', 1, 'Bench', 'usd', $1)
		ON CONFLICT DO NOTHING`, def); err != nil {
		return nil, nil, err
	}
	secrets := make([]string, len(accounts))
	for i, acct := range accounts {
		if err := store.EnsureAccount(ctx, acct, acct); err != nil {
			return nil, nil, err
		}
		if _, err := pool.Exec(ctx, `INSERT INTO subscriptions (id, account_id, plan_id, plan_version, starts_at)
			VALUES ($1, $2, 'bench_fresh', 1, clock_timestamp() - interval '1 hour')`, "sub_"+schemas.NewEventID().String(), acct); err != nil {
			return nil, nil, err
		}
		s, parsed, err := edge.GenerateKey(edge.Secret, schemas.Live)
		if err != nil {
			return nil, nil, err
		}
		if err := store.CreateKey(ctx, edge.NewKey{ID: "key_" + acct, AccountID: acct, Parsed: parsed}); err != nil {
			return nil, nil, err
		}
		secrets[i] = s
	}

	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = up.Serve(upLn) }()

	spool, err := os.MkdirTemp("", "bench-ingest-spool")
	if err != nil {
		_ = up.Close()
		return nil, nil, err
	}
	producer, err := edgekafka.NewProducer(edgekafka.Config{Brokers: brokers, Topic: topic, SpoolDir: spool}, nil, log)
	if err != nil {
		_ = up.Close()
		_ = os.RemoveAll(spool)
		return nil, nil, err
	}
	cache := edge.NewKeyCache(store, 30*time.Second)
	lctx, cancel := context.WithCancel(context.Background())
	if err := edgepg.NewListener(pool.Config().ConnString(), cache, log).Start(lctx); err != nil {
		cancel()
		_ = producer.Close()
		_ = up.Close()
		_ = os.RemoveAll(spool)
		return nil, nil, err
	}
	rdb := redis.NewClient(&redis.Options{Addr: env("TOLLGATE_REDIS_ADDR", "127.0.0.1:16379"),
		Username: os.Getenv("TOLLGATE_REDIS_USERNAME"), Password: os.Getenv("TOLLGATE_REDIS_PASSWORD")})
	lim := &edge.FallbackLimiter{Primary: edgeredis.NewLimiter(rdb), Local: edge.NewLocalLimiter(1)}
	prefix := "tollgate:benchfresh:" + schemas.NewEventID().String()[24:] + ":"
	srv, err := edge.NewServer(edge.Config{Upstream: "http://" + upLn.Addr().String(), RateLimitPrefix: prefix},
		edge.Deps{Keys: cache, Emitter: producer, Limiter: lim, Quota: lim, Log: log})
	var front *edgefast.Front
	if err == nil {
		front, err = edgefast.New(srv, log)
	}
	var ln net.Listener
	if err == nil {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		cancel()
		_ = producer.Close()
		_ = rdb.Close()
		_ = up.Close()
		_ = os.RemoveAll(spool)
		return nil, nil, fmt.Errorf("start the edge: %w", err)
	}
	go func() { _ = front.Serve(ln) }()
	return &freshEdge{addr: ln.Addr().String(), stop: func() {
		_, _ = front.Close()
		_ = producer.Close()
		cancel()
		c, done := context.WithTimeout(context.Background(), 10*time.Second)
		defer done()
		// The limiter's keys: buckets and lease records, refund ledgers,
		// settled batches (in the quota key's hash slot), the quota's own.
		for _, pattern := range []string{"rate:" + prefix + "*", "rate-refunds:" + prefix + "*", "{" + prefix + "*", prefix + "*"} {
			if keys, err := rdb.Keys(c, pattern).Result(); err == nil && len(keys) > 0 {
				_ = rdb.Del(c, keys...).Err()
			}
		}
		_ = rdb.Close()
		_ = up.Close()
		_ = os.RemoveAll(spool)
	}}, secrets, nil
}
