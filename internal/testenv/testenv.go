// Package testenv gives integration tests their own slice of the real local
// services: a fresh Postgres database, ClickHouse database, Kafka topic or
// Redis key prefix per test, so tests run in parallel and reruns start clean.
//
// A test that cannot reach a service fails with a message naming the service
// and how to start it. It never skips.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver for migrations
	"github.com/redis/go-redis/v9"
	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/schemas"
)

// Addresses of the local services, as deploy/local/services.sh starts them.
// Each can be overridden with the environment variable of the same meaning.
var (
	defaultPostgresURL = "postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable"
	defaultClickHouse  = "127.0.0.1:19000"
	defaultKafka       = "127.0.0.1:19092"
	defaultRedis       = "127.0.0.1:16379"
	defaultStripeMock  = "http://127.0.0.1:12111"
)

const howToStart = "start the local services with `make services` (deploy/local/services.sh up)"

// PostgresURL is the administrative Postgres URL tests create databases with.
func PostgresURL() string { return env("TOLLGATE_POSTGRES_URL", defaultPostgresURL) }

// ClickHouseAddr is the ClickHouse native-protocol address.
func ClickHouseAddr() string { return env("TOLLGATE_CLICKHOUSE_ADDR", defaultClickHouse) }

// KafkaBrokers is the Kafka bootstrap address list.
func KafkaBrokers() []string {
	return strings.Split(env("TOLLGATE_KAFKA_BROKERS", defaultKafka), ",")
}

// RedisAddr is the Redis address.
func RedisAddr() string { return env("TOLLGATE_REDIS_ADDR", defaultRedis) }

// StripeMockURL is the base URL of stripe-mock's HTTP listener.
func StripeMockURL() string { return env("TOLLGATE_STRIPE_MOCK_URL", defaultStripeMock) }

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Unreachable fails the test: service is down or refused us.
func Unreachable(t testing.TB, service, addr string, err error) {
	t.Helper()
	t.Fatalf("%s is not reachable at %s: %v\n%s is required by this test: %s", service, addr, err, service, howToStart)
}

// Name returns a short unique identifier derived from the test name, safe
// for database, topic and key names.
func Name(t testing.TB) string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("random name: %v", err)
	}
	base := strings.ToLower(nonIdent.ReplaceAllString(t.Name(), "_"))
	if len(base) > 30 {
		base = base[:30]
	}
	return "t_" + strings.Trim(base, "_") + "_" + hex.EncodeToString(b[:])
}

var nonIdent = regexp.MustCompile(`[^A-Za-z0-9]+`)

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

// Postgres is a fresh, fully migrated database for one test.
type Postgres struct {
	URL  string
	Pool *pgxpool.Pool
	Name string
}

// Strings runs query, which reads one text column, and returns its rows'
// values in order; any error fails t.
func (p *Postgres) Strings(t testing.TB, query string, args ...any) []string {
	t.Helper()
	rows, err := p.Pool.Query(context.Background(), query, args...)
	Must(t, err, "query "+query)
	values, err := pgx.CollectRows(rows, pgx.RowTo[string])
	Must(t, err, "read "+query)
	return values
}

// NewPostgres creates a database for this test, migrates it to the current
// schema and drops it when the test ends.
func NewPostgres(t testing.TB) *Postgres {
	t.Helper()
	db := NewEmptyPostgres(t)
	sqlDB, err := sql.Open("pgx", db.URL)
	if err != nil {
		t.Fatalf("open postgres: %v", err)
	}
	defer sqlDB.Close()
	if _, err := schemas.MigratePostgres(ctx(t), sqlDB); err != nil {
		t.Fatalf("migrate test database %s: %v", db.Name, err)
	}
	return db
}

// NewEmptyPostgres creates an empty database for this test (no migrations)
// and drops it when the test ends.
func NewEmptyPostgres(t testing.TB) *Postgres {
	t.Helper()
	c := ctx(t)
	admin, err := pgx.Connect(c, PostgresURL())
	if err != nil {
		Unreachable(t, "PostgreSQL", PostgresURL(), err)
	}
	defer admin.Close(context.Background())
	name := Name(t)
	if _, err := admin.Exec(c, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	url, err := replaceDatabase(PostgresURL(), name)
	if err != nil {
		t.Fatalf("parse %s: %v", PostgresURL(), err)
	}
	pool, err := pgxpool.New(c, url)
	if err != nil {
		t.Fatalf("connect to %s: %v", name, err)
	}
	t.Cleanup(func() {
		pool.Close()
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if a, err := pgx.Connect(c, PostgresURL()); err == nil {
			_, _ = a.Exec(c, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
			_ = a.Close(c)
		}
	})
	return &Postgres{URL: url, Pool: pool, Name: name}
}

func replaceDatabase(raw, to string) (string, error) {
	u, err := neturl.Parse(raw)
	if err != nil {
		return "", err
	}
	u.Path = "/" + to
	return u.String(), nil
}

// ClickHouse is a fresh database with the current DDL applied.
type ClickHouse struct {
	Addr     string
	Database string
	Conn     driver.Conn
}

// ClickHouseOptions are the connection options for database db.
func ClickHouseOptions(db string) *clickhouse.Options {
	return &clickhouse.Options{
		Addr:        []string{ClickHouseAddr()},
		Auth:        clickhouse.Auth{Database: db, Username: "default"},
		DialTimeout: 5 * time.Second,
		Protocol:    clickhouse.Native,
	}
}

// NewClickHouse creates a ClickHouse database for this test, applies the
// schema and drops the database when the test ends.
func NewClickHouse(t testing.TB) *ClickHouse {
	t.Helper()
	c := ctx(t)
	admin, err := clickhouse.Open(ClickHouseOptions("default"))
	if err == nil {
		err = admin.Ping(c)
	}
	if err != nil {
		Unreachable(t, "ClickHouse", ClickHouseAddr(), err)
	}
	defer admin.Close()
	name := Name(t)
	if err := admin.Exec(c, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create clickhouse database %s: %v", name, err)
	}
	conn, err := clickhouse.Open(ClickHouseOptions(name))
	if err != nil {
		t.Fatalf("connect to clickhouse database %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = conn.Close()
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if a, err := clickhouse.Open(ClickHouseOptions("default")); err == nil {
			_ = a.Exec(c, "DROP DATABASE IF EXISTS "+name)
			_ = a.Close()
		}
	})
	if err := schemas.ApplyClickHouse(c, conn); err != nil {
		t.Fatalf("apply clickhouse schema to %s: %v", name, err)
	}
	return &ClickHouse{Addr: ClickHouseAddr(), Database: name, Conn: conn}
}

// NewTopic creates a Kafka topic with the given number of partitions for this
// test and deletes it when the test ends.
func NewTopic(t testing.TB, partitions int) string {
	t.Helper()
	name := strings.ReplaceAll(Name(t), "_", ".")
	CreateTopic(t, name, partitions)
	return name
}

// CreateTopic creates the named topic and deletes it when the test ends.
func CreateTopic(t testing.TB, name string, partitions int) {
	t.Helper()
	brokers := KafkaBrokers()
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(ctx(t), &kafka.CreateTopicsRequest{
		Topics: []kafka.TopicConfig{{Topic: name, NumPartitions: partitions, ReplicationFactor: 1}},
	})
	if err != nil {
		Unreachable(t, "Kafka", strings.Join(brokers, ","), err)
	}
	if err := res.Errors[name]; err != nil {
		t.Fatalf("create topic %s: %v", name, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, _ = client.DeleteTopics(c, &kafka.DeleteTopicsRequest{Topics: []string{name}})
	})
}

// DeleteRecords removes the records of one partition of topic before
// offset, as retention removes old segments, with Kafka's own
// DeleteRecordsCommand against the local broker.
func DeleteRecords(t testing.TB, topic string, partition int, offset int64) {
	t.Helper()
	spec := filepath.Join(t.TempDir(), "delete.json")
	Must(t, os.WriteFile(spec, fmt.Appendf(nil, `{"version":1,"partitions":[{"topic":%q,"partition":%d,"offset":%d}]}`, topic, partition, offset), 0o600), "write the delete spec")
	cmd := exec.Command("bash", filepath.Join(RepoRoot(t), "deploy/local/services.sh"), "kafka-delete-records", "--offset-json-file", spec)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("delete records (needs the local services: make services): %v\n%s", err, out)
	}
}

// Redis is a client plus a key prefix that no other test uses.
type Redis struct {
	Client *redis.Client
	Prefix string
}

// NewRedis connects to Redis and reserves a key prefix for this test; keys
// under it are deleted when the test ends.
func NewRedis(t testing.TB) *Redis {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: RedisAddr()})
	if err := c.Ping(ctx(t)).Err(); err != nil {
		Unreachable(t, "Redis", RedisAddr(), err)
	}
	prefix := Name(t) + ":"
	t.Cleanup(func() {
		c2, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := c.Scan(c2, 0, prefix+"*", 1000).Iterator()
		for iter.Next(c2) {
			c.Del(c2, iter.Val())
		}
		_ = c.Close()
	})
	return &Redis{Client: c, Prefix: prefix}
}

// RequireStripeMock fails the test unless stripe-mock answers, and returns
// its base URL.
func RequireStripeMock(t testing.TB) string {
	t.Helper()
	u := StripeMockURL()
	host := strings.TrimPrefix(strings.TrimPrefix(u, "http://"), "https://")
	conn, err := net.DialTimeout("tcp", host, 3*time.Second)
	if err != nil {
		Unreachable(t, "stripe-mock", u, err)
	}
	_ = conn.Close()
	return u
}

// Wait polls cond every 50 ms until it returns true or timeout passes, and
// fails the test with msg on timeout. It is for waiting on asynchronous
// pipelines, never for measuring speed.
func Wait(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %s", timeout, msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Must fails the test on err.
func Must(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}
