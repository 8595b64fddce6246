// Package scratch gives benchmarks throw-away databases on the local
// services, migrated to the current schema and dropped afterwards.
package scratch

import (
	"context"
	"database/sql"
	"fmt"
	neturl "net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver for migrations

	"github.com/tollgate-dev/tollgate/schemas"
)

// Postgres creates database name next to url's, migrates it, and returns a
// pool and a function that closes the pool and drops the database.
func Postgres(ctx context.Context, url, name string) (*pgxpool.Pool, func(), error) {
	admin, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to postgres (make services): %w", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return nil, nil, err
	}
	dbURL, err := URL(url, name)
	if err != nil {
		return nil, nil, err
	}
	drop := func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if a, err := pgx.Connect(c, url); err == nil {
			_, _ = a.Exec(c, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
			_ = a.Close(c)
		}
	}
	db, err := sql.Open("pgx", dbURL)
	if err == nil {
		_, err = schemas.MigratePostgres(ctx, db)
		db.Close()
	}
	if err != nil {
		drop()
		return nil, nil, err
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		drop()
		return nil, nil, err
	}
	var current string
	if err := pool.QueryRow(ctx, "SELECT current_database()").Scan(&current); err != nil || current != name {
		pool.Close()
		drop()
		return nil, nil, fmt.Errorf("the scratch pool is connected to %q, not the scratch database %q (%v)", current, name, err)
	}
	return pool, func() { pool.Close(); drop() }, nil
}

// URL is the connection string url with its database replaced by name, in
// either form Postgres takes: a URL (postgres://…/db?…) or key=value pairs.
func URL(conn, name string) (string, error) {
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := neturl.Parse(conn)
		if err != nil {
			return "", fmt.Errorf("the postgres URL does not parse")
		}
		u.Path, u.RawPath = "/"+name, ""
		q := u.Query()
		if q.Has("dbname") {
			q.Del("dbname")
			u.RawQuery = q.Encode()
		}
		return u.String(), nil
	}
	return conn + " dbname=" + name, nil // the last of a key counts
}
