package scratch

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/tollgate-dev/tollgate/schemas"
)

// ClickHouseOptions are the native-protocol options the benchmarks use,
// with room for long analytical queries.
// They log in as TOLLGATE_CLICKHOUSE_USER (default "default") with
// TOLLGATE_CLICKHOUSE_PASSWORD, as tollgate does.
func ClickHouseOptions(addr, db string) *clickhouse.Options {
	user := os.Getenv("TOLLGATE_CLICKHOUSE_USER")
	if user == "" {
		user = "default"
	}
	return &clickhouse.Options{Addr: []string{addr}, Auth: clickhouse.Auth{Database: db, Username: user, Password: os.Getenv("TOLLGATE_CLICKHOUSE_PASSWORD")},
		DialTimeout: 5 * time.Second, ReadTimeout: 10 * time.Minute, Protocol: clickhouse.Native}
}

// ClickHouse creates database name on the server at addr with the current
// schema, and returns a connection to it and a function that closes the
// connection and drops the database.
func ClickHouse(ctx context.Context, addr, name string) (driver.Conn, func(), error) {
	admin, err := clickhouse.Open(ClickHouseOptions(addr, "default"))
	if err == nil {
		err = admin.Ping(ctx)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("connect to clickhouse at %s (make services): %w", addr, err)
	}
	if err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close()
		return nil, nil, fmt.Errorf("create clickhouse database %s: %w", name, err)
	}
	drop := func() {
		c, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = admin.Exec(c, "DROP DATABASE IF EXISTS "+name)
		_ = admin.Close()
	}
	conn, err := clickhouse.Open(ClickHouseOptions(addr, name))
	if err == nil {
		err = schemas.ApplyClickHouse(ctx, conn)
	}
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		drop()
		return nil, nil, err
	}
	return conn, func() { conn.Close(); drop() }, nil
}
