package testenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/redis/go-redis/v9"
)

func TestPrivateTLSRedisServesTLS(t *testing.T) {
	s := PrivateTLSRedis(t)
	trusted := trustCAFile(t, s.CAFile)

	t.Run("a client that trusts the CA sets, gets and runs a script over TLS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		config, handshakes := countHandshakes(trusted)
		rdb := redisClient(s.Addr, config)
		defer rdb.Close()
		key := Name(t)
		if err := rdb.Set(ctx, key, "41", time.Minute).Err(); err != nil {
			t.Fatalf("SET over TLS on %s: %v", s.Addr, err)
		}
		if got, err := rdb.Get(ctx, key).Result(); err != nil || got != "41" {
			t.Fatalf("GET over TLS: %q, %v; want \"41\"", got, err)
		}
		// Quota checks run as Lua scripts: EVAL must work over TLS too.
		got, err := rdb.Eval(ctx, "return redis.call('INCRBY', KEYS[1], ARGV[1])", []string{key}, 1).Int64()
		if err != nil || got != 42 {
			t.Fatalf("EVAL over TLS: %d, %v; want 42", got, err)
		}
		if handshakes.Load() == 0 {
			t.Fatal("the client was served without a verified TLS handshake")
		}
	})

	t.Run("a client that does not trust the CA fails the TLS handshake", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		// The system's roots: the server's CA is in none of them.
		rdb := redisClient(s.Addr, &tls.Config{MinVersion: tls.VersionTLS12})
		defer rdb.Close()
		err := rdb.Ping(ctx).Err()
		if err == nil {
			t.Fatal("a client that does not trust the test CA connected")
		}
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Fatalf("want an x509 unknown authority error, got %T: %v", err, err)
		}
	})

	t.Run("a client without TLS on the TLS port fails", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rdb := redisClient(s.Addr, nil)
		defer rdb.Close()
		err := rdb.Ping(ctx).Err()
		if err == nil {
			t.Fatal("a client without TLS was served on the TLS port")
		}
		t.Logf("without TLS on the TLS port: %v", err)
	})

	t.Run("the plain port still serves without TLS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rdb := redisClient(s.PlainAddr, nil)
		defer rdb.Close()
		if err := rdb.Ping(ctx).Err(); err != nil {
			t.Fatalf("PING on the plain port %s: %v", s.PlainAddr, err)
		}
	})
}

func TestPrivateTLSClickHouseServesTLS(t *testing.T) {
	s := PrivateTLSClickHouse(t)
	trusted := trustCAFile(t, s.CAFile)

	t.Run("a client that trusts the CA queries, creates a table, inserts a batch and reads it back over TLS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		config, handshakes := countHandshakes(trusted)
		conn := clickHouseClient(t, s.Addr, config)
		var one uint8
		if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("SELECT 1 over TLS on %s: %d, %v", s.Addr, one, err)
		}
		db := Name(t)
		Must(t, conn.Exec(ctx, "CREATE DATABASE "+db), "create database over TLS")
		Must(t, conn.Exec(ctx, "CREATE TABLE "+db+".events (id UInt64, name String) ENGINE = MergeTree ORDER BY id"),
			"create table over TLS")
		batch, err := conn.PrepareBatch(ctx, "INSERT INTO "+db+".events (id, name)")
		Must(t, err, "prepare batch over TLS")
		const rows = 100
		for i := range rows {
			Must(t, batch.Append(uint64(i), fmt.Sprintf("event %d", i)), "append to batch")
		}
		Must(t, batch.Send(), "send batch over TLS")

		r, err := conn.Query(ctx, "SELECT id, name FROM "+db+".events ORDER BY id")
		Must(t, err, "select over TLS")
		defer r.Close()
		n := 0
		for r.Next() {
			var (
				id   uint64
				name string
			)
			Must(t, r.Scan(&id, &name), "scan row")
			if id != uint64(n) || name != fmt.Sprintf("event %d", n) {
				t.Fatalf("row %d: (%d, %q)", n, id, name)
			}
			n++
		}
		Must(t, r.Err(), "read rows over TLS")
		if n != rows {
			t.Fatalf("read %d rows back, want %d", n, rows)
		}
		if handshakes.Load() == 0 {
			t.Fatal("the client was served without a verified TLS handshake")
		}
	})

	t.Run("a client that does not trust the CA fails the TLS handshake", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		// The system's roots: the server's CA is in none of them.
		conn := clickHouseClient(t, s.Addr, &tls.Config{MinVersion: tls.VersionTLS12})
		err := conn.Ping(ctx)
		if err == nil {
			t.Fatal("a client that does not trust the test CA connected")
		}
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Fatalf("want an x509 unknown authority error, got %T: %v", err, err)
		}
	})

	t.Run("a client without TLS on the secure port fails", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn := clickHouseClient(t, s.Addr, nil)
		err := conn.Ping(ctx)
		if err == nil {
			t.Fatal("a client without TLS was served on the secure port")
		}
		t.Logf("without TLS on the secure port: %v", err)
	})

	t.Run("the plain native port still serves without TLS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn := clickHouseClient(t, s.PlainAddr, nil)
		if err := conn.Ping(ctx); err != nil {
			t.Fatalf("ping the plain native port %s: %v", s.PlainAddr, err)
		}
	})
}

// trustCAFile is a client TLS configuration that trusts the CA in file
// only, as a client configured with a CA file path would be.
func trustCAFile(t *testing.T, file string) *tls.Config {
	t.Helper()
	caPEM, err := os.ReadFile(file)
	Must(t, err, "read the CA file")
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("no certificate in %s", file)
	}
	return &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
}

// countHandshakes is a copy of config that counts the TLS handshakes in
// which it verified the server, so that a test sees its client did use TLS.
func countHandshakes(config *tls.Config) (*tls.Config, *atomic.Int32) {
	c := config.Clone()
	var n atomic.Int32
	// Called only once the server's certificate chain has verified.
	c.VerifyConnection = func(tls.ConnectionState) error {
		n.Add(1)
		return nil
	}
	return c, &n
}

// redisClient is a client of addr with TLS when tlsConfig is set. It does
// not retry a command or a dial, so a failure shows at once, and every wait
// is bounded.
func redisClient(addr string, tlsConfig *tls.Config) *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr:          addr,
		TLSConfig:     tlsConfig,
		DialTimeout:   5 * time.Second,
		ReadTimeout:   5 * time.Second,
		WriteTimeout:  5 * time.Second,
		MaxRetries:    -1,
		DialerRetries: 1,
	})
}

// clickHouseClient is a native-protocol client of addr, with TLS when
// tlsConfig is set, closed when the test ends. Every wait is bounded.
func clickHouseClient(t *testing.T, addr string, tlsConfig *tls.Config) clickhouse.Conn {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:        []string{addr},
		Auth:        clickhouse.Auth{Database: "default", Username: "default"},
		TLS:         tlsConfig,
		Protocol:    clickhouse.Native,
		DialTimeout: 5 * time.Second,
		ReadTimeout: 20 * time.Second,
	})
	Must(t, err, "open a clickhouse client of "+addr)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}
