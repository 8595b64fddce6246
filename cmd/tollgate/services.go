package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
	"github.com/tollgate-dev/tollgate/schemas"
)

const startHint = "is it running? `make services` starts the local services"

// openPostgres connects and migrates the schema forward.
func openPostgres(ctx context.Context, url string) (*pgxpool.Pool, error) {
	if err := checkPostgresURL(url); err != nil {
		return nil, err
	}
	// One parse, pgxpool's: it takes the pool's own settings (pool_*) out
	// of what is sent to the server, which refuses a login naming them.
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, withoutConnString(err)
	}
	if cfg.PingTimeout == 0 {
		// The pool pings a connection it hands out after a quiet spell;
		// without a bound, a Postgres gone silent held it for as long as
		// the caller would wait (pool_ping_timeout in the URL overrides).
		cfg.PingTimeout = poolPingTimeout
	}
	db := stdlib.OpenDB(*cfg.ConnConfig.Copy())
	defer db.Close()
	if err := db.PingContext(ctx); err != nil {
		return nil, fmt.Errorf("connect to postgres (%s): %w", startHint, withoutConnString(err))
	}
	if _, err := schemas.MigratePostgres(ctx, db); err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres: %w", withoutConnString(err))
	}
	return pool, nil
}

// poolPingTimeout bounds the pool's ping of a connection it hands out.
const poolPingTimeout = 5 * time.Second

// withoutConnString is err, or, when it is the driver's refusal of the
// connection string, a message that does not quote it: the driver masks
// the password in what it quotes only as best it can (not after
// "password = " or an escaped quote).
func withoutConnString(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("services.postgres_url: not a connection string the driver can parse; it is not shown, as it may hold a password")
	}
	return err
}

var chIdent = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// openClickHouse creates the database if needed, applies the DDL and
// returns a connection to it.
func openClickHouse(ctx context.Context, svc Services, database string) (driver.Conn, error) {
	if !chIdent.MatchString(database) {
		return nil, fmt.Errorf("clickhouse database name %q: letters, digits and _ only", database)
	}
	addr := svc.ClickHouseAddr
	adminOpts, err := clickHouseOptions(svc, "default")
	if err != nil {
		return nil, err
	}
	admin, err := clickhouse.Open(adminOpts)
	if err != nil {
		return nil, fmt.Errorf("open clickhouse: %w", err)
	}
	defer admin.Close()
	if err := admin.Ping(ctx); err != nil {
		var refused *clickhouse.Exception
		if errors.As(err, &refused) { // it answered: a wrong user or password, say
			return nil, fmt.Errorf("log in to clickhouse at %s as %s: %w", addr, svc.ClickHouseUser, err)
		}
		if tlsFailure(err) { // it answered, but not as services.clickhouse_tls* expect
			return nil, fmt.Errorf("connect to clickhouse at %s over TLS (services.clickhouse_tls*): %w", addr, err)
		}
		return nil, fmt.Errorf("connect to clickhouse at %s (%s): %w", addr, startHint, err)
	}
	if err := admin.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+database); err != nil {
		return nil, fmt.Errorf("create clickhouse database: %w", err)
	}
	dbOpts, err := clickHouseOptions(svc, database)
	if err != nil {
		return nil, err
	}
	conn, err := clickhouse.Open(dbOpts)
	if err != nil {
		return nil, fmt.Errorf("open clickhouse: %w", err)
	}
	if err := schemas.ApplyClickHouse(ctx, conn); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// clickHouseOptions connects to database on svc's ClickHouse as its user,
// over TLS when svc says so.
func clickHouseOptions(svc Services, database string) (*clickhouse.Options, error) {
	user := svc.ClickHouseUser
	if user == "" {
		user = "default"
	}
	tc, err := svc.clickHouseTLS()
	if err != nil {
		return nil, err
	}
	return &clickhouse.Options{
		Addr:        []string{svc.ClickHouseAddr},
		Auth:        clickhouse.Auth{Database: database, Username: user, Password: svc.ClickHousePassword},
		DialTimeout: 5 * time.Second,
		Protocol:    clickhouse.Native,
		TLS:         tc,
	}, nil
}

// brokerDefault, as a topic's replication factor, is the broker's
// default.replication.factor. A topic made with 1 on a cluster of several
// brokers had one copy of every event: RequireAll meant one broker, and
// that broker's restart took the partition offline.
const brokerDefault = -1

// kafkaCluster is where the brokers are and how to reach them.
type kafkaCluster struct {
	brokers []string
	sec     kafkaconn.Security
}

// kafkaCluster reads the brokers' settings (an error names the setting at
// fault).
func (s Services) kafkaCluster() (kafkaCluster, error) {
	sec, err := s.kafkaSecurity()
	return kafkaCluster{brokers: s.KafkaBrokers, sec: sec}, err
}

// ensureTopics creates the topics that do not exist yet, with the broker's
// defaults but for the partition count.
func ensureTopics(ctx context.Context, kc kafkaCluster, partitions int, topics ...string) error {
	cfgs := make([]kafka.TopicConfig, len(topics))
	for i, t := range topics {
		cfgs[i] = kafka.TopicConfig{Topic: t, NumPartitions: partitions, ReplicationFactor: brokerDefault}
	}
	return ensureTopicConfigs(ctx, kc, cfgs...)
}

// ensureTopicConfigs creates the topics of cfgs that do not exist yet; one
// that exists is left as it is.
func ensureTopicConfigs(ctx context.Context, kc kafkaCluster, cfgs ...kafka.TopicConfig) error {
	transport := kc.sec.Transport()
	defer transport.CloseIdleConnections()
	client := &kafka.Client{Addr: kafka.TCP(kc.brokers...), Timeout: 15 * time.Second, Transport: transport}
	topics := make([]string, len(cfgs))
	for i, c := range cfgs {
		topics[i] = c.Topic
	}
	res, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: cfgs})
	if err != nil {
		return fmt.Errorf("create kafka topics (%s): %w", startHint, err)
	}
	for t, err := range res.Errors {
		if err != nil && !errors.Is(err, kafka.TopicAlreadyExists) {
			return fmt.Errorf("create kafka topic %s: %w", t, err)
		}
	}
	return waitForLeaders(ctx, client, topics)
}

// waitForLeaders waits, for up to 15 s, until every partition of topics
// answers as its leader. For a moment after a topic is created (here, or by
// another component starting beside this one) the metadata already names a
// leader but the broker still answers "not leader for partition"; without
// the wait a component started on a fresh broker would spool its first
// events or log its first offset fetch as a failure.
func waitForLeaders(ctx context.Context, client *kafka.Client, topics []string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		pending := leaderless(ctx, client, topics)
		if pending == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for kafka topic leaders: %s", pending)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// leaderless says what is not yet served among topics' partitions, or ""
// when every partition answers a list-offsets request.
func leaderless(ctx context.Context, client *kafka.Client, topics []string) string {
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: topics})
	if err != nil {
		return err.Error()
	}
	req := &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{}}
	for _, t := range md.Topics {
		if t.Error != nil {
			return fmt.Sprintf("topic %s: %v", t.Name, t.Error)
		}
		for _, p := range t.Partitions {
			req.Topics[t.Name] = append(req.Topics[t.Name], kafka.LastOffsetOf(p.ID))
		}
	}
	if len(req.Topics) < len(topics) {
		return "topic metadata incomplete"
	}
	res, err := client.ListOffsets(ctx, req)
	if err != nil {
		return err.Error()
	}
	for t, parts := range res.Topics {
		for _, p := range parts {
			if p.Error != nil {
				return fmt.Sprintf("topic %s partition %d: %v", t, p.Partition, p.Error)
			}
		}
	}
	return ""
}

// metricsServer listens on addr and serves reg's Prometheus /metrics
// there, with /healthz (the process serves) and /readyz (ready, or 503 with
// the cause logged to log). The caller starts serving.
func metricsServer(addr string, reg prometheus.Gatherer, ready func(context.Context) error, log *slog.Logger) (net.Listener, *http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := ready(r.Context()); err != nil {
			log.Warn("not ready", "err", err)
			http.Error(w, "not ready: a dependency is unavailable; see the log", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	return ln, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, nil
}

// readyPingTimeout bounds each dependency's check for /readyz: a probe
// answers 503 within about a second rather than wait on a dependency gone
// silent for as long as the prober would.
const readyPingTimeout = time.Second

// dependency is one service a component needs to do its work, checked for
// its /readyz.
type dependency struct {
	name  string
	check func(context.Context) error
}

// readiness checks deps in turn, each within readyPingTimeout, and returns
// the first that fails. A check that outlives its deadline is not waited
// for: ClickHouse's driver, dialling a server gone silent, waits out its
// own handshake timeout whatever the context says.
func readiness(deps ...dependency) func(context.Context) error {
	return func(ctx context.Context) error {
		for _, d := range deps {
			cctx, cancel := context.WithTimeout(ctx, readyPingTimeout)
			res := make(chan error, 1)
			go func() { res <- d.check(cctx) }()
			var err error
			select {
			case err = <-res:
			case <-cctx.Done():
				err = fmt.Errorf("no answer within %s", readyPingTimeout)
			}
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %w", d.name, err)
			}
		}
		return nil
	}
}

func postgresDep(p *pgxpool.Pool) dependency { return dependency{"postgres", p.Ping} }

func clickhouseDep(c driver.Conn) dependency { return dependency{"clickhouse", c.Ping} }

// kafkaDep is Kafka answering on one of kc's brokers (through TLS and
// SASL when kc has them: a broker that refuses the credentials is not
// ready for this process).
func kafkaDep(kc kafkaCluster) dependency {
	d := kc.sec.Dialer(10 * time.Second)
	return dependency{"kafka", func(ctx context.Context) error {
		var errs []error
		for _, b := range kc.brokers {
			c, err := d.DialContext(ctx, "tcp", b)
			if err == nil {
				if dl, ok := ctx.Deadline(); ok {
					_ = c.SetDeadline(dl)
				}
				_, err = c.ApiVersions()
				_ = c.Close()
			}
			if err == nil {
				return nil
			}
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	}}
}

// tlsFailure reports whether err is a TLS handshake's failure: a server
// that answered, so "is it running?" would point the wrong way.
func tlsFailure(err error) bool {
	var certErr *tls.CertificateVerificationError
	var recErr tls.RecordHeaderError
	var alert tls.AlertError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	return errors.As(err, &certErr) || errors.As(err, &recErr) || errors.As(err, &alert) ||
		errors.As(err, &unknownCA) || errors.As(err, &hostErr)
}
