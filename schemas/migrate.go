package schemas

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"time"

	"github.com/pressly/goose/v3"
)

//go:embed postgres/migrations/*.sql
var postgresFS embed.FS

//go:embed clickhouse/*.sql
var clickhouseFS embed.FS

// PostgresMigrations is the ordered set of Postgres migrations.
func PostgresMigrations() (fs.FS, error) {
	return fs.Sub(postgresFS, "postgres/migrations")
}

// migrationLock is the advisory lock key processes migrating one database
// take in turn ("tollgate" in ASCII).
const migrationLock = int64(0x746f6c6c67617465)

// MigratePostgres applies every pending migration in order, each in its own
// transaction, and returns the version the database is at afterwards.
func MigratePostgres(ctx context.Context, db *sql.DB) (int64, error) {
	return MigratePostgresTo(ctx, db, -1)
}

// MigratePostgresTo applies pending migrations up to and including version
// (all of them when version is negative).
func MigratePostgresTo(ctx context.Context, db *sql.DB, version int64) (int64, error) {
	migrations, err := PostgresMigrations()
	if err != nil {
		return 0, fmt.Errorf("load postgres migrations: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations)
	if err != nil {
		return 0, fmt.Errorf("load postgres migrations: %w", err)
	}
	// Every process that opens Postgres migrates first, and components
	// (or replicas) start together: one at a time, or the others failed
	// to start on the first one's DDL (duplicate key in pg_type). The
	// lock is the database's own (advisory locks are per database), taken
	// on one connection for the whole run and waited for as long as the
	// holder migrates.
	if db.Stats().MaxOpenConnections == 1 {
		// The lock holds one, goose needs another.
		return 0, errors.New("migrate postgres: the database handle allows one connection; migrating takes two")
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		return 0, fmt.Errorf("migrate postgres: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock($1)", migrationLock); err != nil {
		return 0, fmt.Errorf("migrate postgres: wait for another process's migration: %w", err)
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = conn.ExecContext(c, "SELECT pg_advisory_unlock($1)", migrationLock)
	}()
	if version < 0 {
		_, err = p.Up(ctx)
	} else {
		_, err = p.UpTo(ctx, version)
	}
	if err != nil {
		return 0, fmt.Errorf("migrate postgres: %w", err)
	}
	v, err := p.GetDBVersion(ctx)
	if err != nil {
		return 0, fmt.Errorf("read postgres schema version: %w", err)
	}
	return v, nil
}

// Execer runs one statement. The ClickHouse driver's Conn satisfies it.
type Execer interface {
	Exec(ctx context.Context, query string, args ...any) error
}

// ClickHouseDDL returns the ClickHouse statements in the order they apply.
// Each file holds statements separated by lines that end in ';' and every
// statement is idempotent, so applying them again is harmless. Table names
// are unqualified: the connection's database decides where they land.
func ClickHouseDDL() ([]string, error) {
	entries, err := fs.ReadDir(clickhouseFS, "clickhouse")
	if err != nil {
		return nil, fmt.Errorf("read clickhouse ddl: %w", err)
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	var stmts []string
	for _, n := range names {
		b, err := clickhouseFS.ReadFile("clickhouse/" + n)
		if err != nil {
			return nil, fmt.Errorf("read clickhouse ddl %s: %w", n, err)
		}
		stmts = append(stmts, splitStatements(string(b))...)
	}
	return stmts, nil
}

// ApplyClickHouse creates or updates every ClickHouse object in order.
func ApplyClickHouse(ctx context.Context, conn Execer) error {
	stmts, err := ClickHouseDDL()
	if err != nil {
		return err
	}
	for _, s := range stmts {
		if err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("apply clickhouse ddl %q: %w", firstLine(s), err)
		}
	}
	return nil
}

// splitStatements splits on ';' at the end of a line and drops comment-only
// lines, so the files can be read and commented like ordinary SQL.
func splitStatements(src string) []string {
	var out []string
	var cur strings.Builder
	for _, line := range strings.Split(src, "\n") {
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "--") || t == "" {
			continue
		}
		cur.WriteString(line)
		cur.WriteString("\n")
		if strings.HasSuffix(t, ";") {
			out = append(out, strings.TrimSuffix(strings.TrimSpace(cur.String()), ";"))
			cur.Reset()
		}
	}
	if s := strings.TrimSpace(cur.String()); s != "" {
		out = append(out, s)
	}
	return out
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
