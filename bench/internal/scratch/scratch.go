// Package scratch gives benchmarks throw-away databases on the local
// services, migrated to the current schema and dropped afterwards.
package scratch

import (
	"context"
	"database/sql"
	"fmt"
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
	cfg, _ := pgx.ParseConfig(url)
	dbURL := strings.Replace(url, "/"+cfg.Database+"?", "/"+name+"?", 1)
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
	return pool, func() { pool.Close(); drop() }, nil
}
