package main

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
)

func TestEnsureTopicsReturnsOnlyOnceEveryPartitionTakesWrites(t *testing.T) {
	brokers := testenv.KafkaBrokers()
	name := strings.ReplaceAll(testenv.Name(t), "_", ".")
	topics := []string{name, name + ".dlq"}
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, _ = client.DeleteTopics(ctx, &kafka.DeleteTopicsRequest{Topics: topics})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensureTopics(ctx, kafkaCluster{brokers: brokers}, 4, topics...); err != nil {
		testenv.Unreachable(t, "Kafka", strings.Join(brokers, ","), err)
	}
	// One write to every partition of each new topic, with no retry: a
	// partition whose leader is not serving yet fails it. The writer has a
	// transport of its own, as each component's producer does: one shared
	// with earlier tests could hold the topic list from before the topics
	// existed for up to its metadata TTL.
	for _, topic := range topics {
		w := &kafka.Writer{
			Addr: kafka.TCP(brokers...), Topic: topic, RequiredAcks: kafka.RequireAll, MaxAttempts: 1, Transport: &kafka.Transport{},
			BatchTimeout: time.Millisecond,
			Balancer: kafka.BalancerFunc(func(m kafka.Message, partitions ...int) int {
				return int(m.Key[0]-'0') % len(partitions)
			}),
		}
		msgs := []kafka.Message{{Key: []byte("0")}, {Key: []byte("1")}, {Key: []byte("2")}, {Key: []byte("3")}}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			t.Errorf("write to every partition of %s right after ensureTopics: %v", topic, err)
		}
		_ = w.Close()
	}
	t.Run("a second call on existing topics returns at once", func(t *testing.T) {
		start := time.Now()
		if err := ensureTopics(ctx, kafkaCluster{brokers: brokers}, 4, topics...); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("ensureTopics on existing topics took %s", d)
		}
	})
}

// A Redis that requires a password (services.redis_password) is used with
// it: the edge's limits go to Redis, not to each edge's local fallback.
// Without the password setting, every limit was decided locally.
func TestTheEdgeLogsInToARedisThatAsksForAPassword(t *testing.T) {
	r := testenv.PrivateRedis(t)
	ctx := context.Background()
	admin := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer admin.Close()
	testenv.Must(t, admin.ConfigSet(ctx, "requirepass", "s3cret-for-tests").Err(), "ask for a password")
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	t.Cleanup(up.Close)
	for _, c := range []struct {
		name, password string
		wantRedis      bool
	}{{"without the password", "", false}, {"with it", "s3cret-for-tests", true}} {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig(t, pg, ch, "redisauth."+testenv.Name(t))
			cfg.Services.RedisAddr, cfg.Services.RedisPassword = r.Addr, c.password
			cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), up.URL
			answered, logs := edgeReachesRedis(t, ctx, cfg)
			if answered != c.wantRedis {
				t.Fatalf("Redis answering: %v, want %v:\n%s", answered, c.wantRedis, logs)
			}
			if strings.Contains(logs, "s3cret-for-tests") {
				t.Fatal("the log holds Redis's password")
			}
		})
	}
}

// A ClickHouse password (services.clickhouse_password) is sent: the wrong
// one is refused by the server, so the user's own is what logs in.
func TestTheClickHousePasswordIsSent(t *testing.T) {
	ch := testenv.NewClickHouse(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svc := Services{ClickHouseAddr: ch.Addr, ClickHouseUser: "default"}
	conn, err := openClickHouse(ctx, svc, ch.Database)
	testenv.Must(t, err, "log in as default with its (empty) password")
	conn.Close()
	svc.ClickHousePassword = "not-default's-password"
	_, err = openClickHouse(ctx, svc, ch.Database)
	// 18.16 says "Wrong password for user default", current releases
	// "Authentication failed".
	if err == nil || !strings.Contains(err.Error(), "Wrong password") && !strings.Contains(err.Error(), "Authentication failed") {
		t.Fatalf("a wrong ClickHouse password: %v, want the server's refusal", err)
	}
	if strings.Contains(err.Error(), svc.ClickHousePassword) || strings.Contains(err.Error(), "is it running") {
		t.Fatalf("the error holds the password, or blames a server that answered: %v", err)
	}
}

// ClickHouse and Redis reached over TLS (services.clickhouse_tls,
// services.redis_tls) by the commands' own clients, against real servers
// whose TLS ports take nothing else: ClickHouse is opened, its database
// made and the schema applied; the edge's limits go to Redis, not to the
// local fallback. Without the settings, neither server is reached.
func TestClickHouseAndRedisOverTLS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t.Run("ClickHouse's secure port takes the schema over TLS, and refuses a plain client", func(t *testing.T) {
		ch := testenv.PrivateTLSClickHouse(t)
		svc := Services{ClickHouseAddr: ch.Addr, ClickHouseUser: "default", ClickHouseTLS: true, ClickHouseTLSCAFile: ch.CAFile}
		conn, err := openClickHouse(ctx, svc, "tls_schema")
		testenv.Must(t, err, "open ClickHouse over TLS")
		var n uint64
		testenv.Must(t, conn.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = 'tls_schema' AND name = 'usage_events'").Scan(&n), "list tables")
		conn.Close()
		if n != 1 {
			t.Fatalf("usage_events in tls_schema: %d, want the schema applied", n)
		}
		svc.ClickHouseTLS, svc.ClickHouseTLSCAFile = false, ""
		if _, err := openClickHouse(ctx, svc, "tls_schema"); err == nil {
			t.Fatal("a plain client on the secure port was let in")
		}
		// A server that answered, with a certificate no CA given vouches
		// for: the error says TLS, not "is it running?".
		svc.ClickHouseTLS = true
		_, err = openClickHouse(ctx, svc, "tls_schema")
		if err == nil || !strings.Contains(err.Error(), "over TLS") || strings.Contains(err.Error(), "is it running") {
			t.Fatalf("an untrusted certificate: %v; want a TLS error without the start hint", err)
		}
	})
	t.Run("the edge's limits reach Redis over TLS (with a client certificate where asked), and other clients fall back", func(t *testing.T) {
		tlsOnly, mutual := testenv.PrivateTLSRedis(t), testenv.PrivateMutualTLSRedis(t)
		pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
		t.Cleanup(up.Close)
		for _, c := range []struct {
			name       string
			r          *testenv.TLSServer
			tls        bool
			clientCert bool
			wantRedis  bool
		}{
			{"without TLS", tlsOnly, false, false, false},
			{"with TLS", tlsOnly, true, false, true},
			{"without a client certificate, where one is asked for", mutual, true, false, false},
			{"with a client certificate, where one is asked for", mutual, true, true, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				cfg := testConfig(t, pg, ch, "redistls."+testenv.Name(t))
				cfg.Services.RedisAddr = c.r.Addr
				if c.tls {
					cfg.Services.RedisTLS, cfg.Services.RedisTLSCAFile = true, c.r.CAFile
				}
				if c.clientCert {
					cfg.Services.RedisTLSCertFile, cfg.Services.RedisTLSKeyFile = c.r.ClientCertFile, c.r.ClientKeyFile
				}
				cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), up.URL
				if answered, logs := edgeReachesRedis(t, ctx, cfg); answered != c.wantRedis {
					t.Fatalf("Redis answering: %v, want %v:\n%s", answered, c.wantRedis, logs)
				}
			})
		}
	})
}

// edgeReachesRedis starts the edge on cfg and reports whether Redis
// answered it (it warns when not), with what it logged.
func edgeReachesRedis(t *testing.T, ctx context.Context, cfg Config) (bool, string) {
	t.Helper()
	var logs testenv.LogBuffer
	m, err := NewEdgeMain(ctx, cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	testenv.Must(t, err, "start the edge")
	t.Cleanup(func() { _ = m.Close() })
	return !strings.Contains(logs.String(), "redis is not answering"), logs.String()
}
