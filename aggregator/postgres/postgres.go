// Package postgres reads account time zones and the edges' spool holds, and
// stores operator-defined meters, in Postgres.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tollgate-dev/tollgate/aggregator"
	"github.com/tollgate-dev/tollgate/internal/caltime"
	"github.com/tollgate-dev/tollgate/meter"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Zones reads accounts.timezone, caching each answer for TTL: ingest asks
// for every batch, and a zone change needs a rollup rebuild anyway.
//
// An account whose zone does not load is rolled up in UTC, with a warning,
// as the edge counts its quota months in UTC: one bad row must not stop
// every other account's rollups. While Postgres cannot be read, answers
// past their TTL are used as they are.
type Zones struct {
	pool *pgxpool.Pool
	ttl  time.Duration
	log  *slog.Logger
	now  func() time.Time
	mu   sync.Mutex
	seen map[string]cachedZone
}

type cachedZone struct {
	zone string
	at   time.Time
}

var _ aggregator.Zones = (*Zones)(nil)

// NewZones returns a Zones over pool.
func NewZones(pool *pgxpool.Pool, ttl time.Duration, log *slog.Logger) *Zones {
	return &Zones{pool: pool, ttl: ttl, log: log, now: time.Now, seen: map[string]cachedZone{}}
}

// Zones returns the zone of each known account; unknown accounts are
// left out (callers treat them as UTC).
func (z *Zones) Zones(ctx context.Context, accounts []string) (map[string]string, error) {
	now := z.now()
	out := make(map[string]string, len(accounts))
	var missing []string
	z.mu.Lock()
	for _, a := range accounts {
		if c, ok := z.seen[a]; ok && now.Sub(c.at) < z.ttl {
			if c.zone != "" {
				out[a] = c.zone
			}
			continue
		}
		missing = append(missing, a)
	}
	z.mu.Unlock()
	if len(missing) == 0 {
		return out, nil
	}
	found, err := z.read(ctx, missing)
	if err != nil {
		return z.stale(out, missing, err)
	}
	z.mu.Lock()
	for _, a := range missing {
		z.seen[a] = cachedZone{zone: found[a], at: now}
		if tz := found[a]; tz != "" {
			out[a] = tz
		}
	}
	z.mu.Unlock()
	return out, nil
}

func (z *Zones) read(ctx context.Context, accounts []string) (map[string]string, error) {
	rows, err := z.pool.Query(ctx, "SELECT id, timezone FROM accounts WHERE id = ANY($1)", accounts)
	if err != nil {
		return nil, fmt.Errorf("read account time zones: %w", err)
	}
	defer rows.Close()
	found := map[string]string{}
	for rows.Next() {
		var id, tz string
		if err := rows.Scan(&id, &tz); err != nil {
			return nil, fmt.Errorf("read account time zones: %w", err)
		}
		if _, err := caltime.LoadZone(tz); err != nil {
			z.log.Warn("account time zone does not load; its rollups follow UTC (fix the zone, then rebuild its rollups)",
				"account", id, "timezone", tz, "err", err)
			continue
		}
		found[id] = tz
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read account time zones: %w", err)
	}
	return found, nil
}

// stale completes out from answers past their TTL when Postgres could not
// be read; it fails with err when an account has never been answered.
func (z *Zones) stale(out map[string]string, missing []string, err error) (map[string]string, error) {
	z.mu.Lock()
	defer z.mu.Unlock()
	for _, a := range missing {
		c, ok := z.seen[a]
		if !ok {
			return nil, err
		}
		if c.zone != "" {
			out[a] = c.zone
		}
	}
	z.log.Warn("account time zones read from the cache past its TTL", "accounts", len(missing), "err", err)
	return out, nil
}

// Meters stores meters created through the admin API.
type Meters struct {
	pool *pgxpool.Pool
}

var (
	_ aggregator.MeterStore  = (*Meters)(nil)
	_ aggregator.PastRollups = (*Meters)(nil)
)

// NewMeters returns a Meters over pool.
func NewMeters(pool *pgxpool.Pool) *Meters { return &Meters{pool: pool} }

// List returns every stored meter, in key order. A row whose definition
// does not decode is left out and named in an aggregator.UndecodableMeters
// error returned with the others.
func (s *Meters) List(ctx context.Context) ([]meter.Meter, error) {
	return s.query(ctx, "list meters", "SELECT key, definition FROM meters ORDER BY key")
}

// query reads the meters sql selects (key, definition).
func (s *Meters) query(ctx context.Context, what, sql string) ([]meter.Meter, error) {
	rows, err := s.pool.Query(ctx, sql)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer rows.Close()
	var out []meter.Meter
	var bad aggregator.UndecodableMeters
	for rows.Next() {
		var key string
		var b []byte
		if err := rows.Scan(&key, &b); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		var m meter.Meter
		if err := json.Unmarshal(b, &m); err != nil {
			bad = append(bad, aggregator.RefusedMeter{Key: key, Reason: "its stored definition does not decode: " + err.Error()})
			continue
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if len(bad) > 0 {
		return out, bad
	}
	return out, nil
}

// Create stores m. It reports created=false when an identical meter exists
// and aggregator.ErrConflict when a different one has the key.
func (s *Meters) Create(ctx context.Context, m meter.Meter) (bool, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return false, fmt.Errorf("encode meter: %w", err)
	}
	tag, err := s.pool.Exec(ctx, "INSERT INTO meters (key, definition) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", m.Key, b)
	if err != nil {
		return false, fmt.Errorf("create meter %s: %w", m.Key, err)
	}
	if tag.RowsAffected() == 1 {
		return true, nil
	}
	var stored []byte
	if err := s.pool.QueryRow(ctx, "SELECT definition FROM meters WHERE key = $1", m.Key).Scan(&stored); err != nil {
		return false, fmt.Errorf("read meter %s: %w", m.Key, err)
	}
	var old meter.Meter
	if err := json.Unmarshal(stored, &old); err != nil {
		return false, fmt.Errorf("stored meter: %w", err)
	}
	if meter.Equal(old, m) {
		return false, nil
	}
	return false, errors.Join(aggregator.ErrConflict, fmt.Errorf("meter %q already exists with a different definition; meters are never edited, create one with a new key", m.Key))
}

// Unbackfilled returns the stored meters whose backfill never finished
// (their aggregator stopped during it), in key order.
func (s *Meters) Unbackfilled(ctx context.Context) ([]meter.Meter, error) {
	return s.query(ctx, "list meters to backfill", "SELECT key, definition FROM meters WHERE backfilled_at IS NULL ORDER BY key")
}

// ClaimBackfill records that a backfill of m is starting under claim,
// taking over any earlier claim. It reports false when m is backfilled
// already or is no longer stored under this definition.
func (s *Meters) ClaimBackfill(ctx context.Context, m meter.Meter, claim uuid.UUID) (bool, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return false, fmt.Errorf("encode meter: %w", err)
	}
	tag, err := s.pool.Exec(ctx, `UPDATE meters SET backfill_claim = $3
		WHERE key = $1 AND definition = $2::jsonb AND backfilled_at IS NULL`, m.Key, b, claim)
	if err != nil {
		return false, fmt.Errorf("claim meter %s's backfill: %w", m.Key, err)
	}
	return tag.RowsAffected() == 1, nil
}

// ClaimStands tells whether the backfill of key under claim is still to
// finish and no later claim has taken it over.
func (s *Meters) ClaimStands(ctx context.Context, key string, claim uuid.UUID) (bool, error) {
	var ok bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM meters
		WHERE key = $1 AND backfill_claim = $2 AND backfilled_at IS NULL)`, key, claim).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("check meter %s's backfill claim: %w", key, err)
	}
	return ok, nil
}

// Backfilled records that the backfill of key under claim has finished,
// and (in config_meters) that the key's rollups are now computed under the
// stored definition. It reports false when a later claim took the backfill
// over (it deleted rows this one wrote, and records its own finish) or it
// was recorded.
func (s *Meters) Backfilled(ctx context.Context, key string, claim uuid.UUID) (bool, error) {
	tag, err := s.pool.Exec(ctx, `WITH done AS (
			UPDATE meters SET backfilled_at = now()
			WHERE key = $1 AND backfill_claim = $2 AND backfilled_at IS NULL
			RETURNING key, definition)
		INSERT INTO config_meters (key, definition) SELECT key, definition FROM done
		ON CONFLICT (key) DO UPDATE SET definition = EXCLUDED.definition, rolled_up_at = now()`, key, claim)
	if err != nil {
		return false, fmt.Errorf("record meter %s backfilled: %w", key, err)
	}
	return tag.RowsAffected() == 1, nil
}

// Reconcile brings the record of the definitions each meter key's rollups
// were computed under (config_meters, written when a configuration file's
// meter is rolled up and when a stored meter's backfill finishes) in line
// with the meters in force, config being the configuration file's, before
// an aggregator rolls anything up:
//
//   - A key that no meter defines any longer is forgotten: its rows stop
//     being written while it is gone, so a meter given that key again is
//     new, and computed from the raw events, not taken as up to date.
//   - A stored meter that the file no longer shadows, whose key's rows
//     were computed under another definition (the file's), is to be
//     backfilled again: its backfilled_at is cleared, so that the
//     aggregator backfills it and the usage API says it is backfilling.
//
// It returns the keys it forgot and those it set to backfill again.
func (s *Meters) Reconcile(ctx context.Context, config []meter.Meter) (forgotten, rebackfill []string, err error) {
	recorded, err := s.query(ctx, "read config meters", "SELECT key, definition FROM config_meters")
	if err != nil && !errors.As(err, new(aggregator.UndecodableMeters)) {
		return nil, nil, err
	}
	stored, err := s.query(ctx, "read meters", "SELECT key, definition FROM meters")
	if err != nil && !errors.As(err, new(aggregator.UndecodableMeters)) {
		return nil, nil, err
	}
	var storedKeys []string
	rows, err := s.pool.Query(ctx, "SELECT key FROM meters")
	if err != nil {
		return nil, nil, fmt.Errorf("read meter keys: %w", err)
	}
	if storedKeys, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return nil, nil, fmt.Errorf("read meter keys: %w", err)
	}
	inFile := func(key string) bool {
		return slices.ContainsFunc(config, func(m meter.Meter) bool { return m.Key == key })
	}
	for _, r := range recorded {
		if !inFile(r.Key) && !slices.Contains(storedKeys, r.Key) {
			forgotten = append(forgotten, r.Key)
		}
	}
	var differ []string
	for _, m := range stored {
		if inFile(m.Key) {
			continue
		}
		i := slices.IndexFunc(recorded, func(r meter.Meter) bool { return r.Key == m.Key })
		if i >= 0 && !meter.Equal(recorded[i], m) {
			differ = append(differ, m.Key)
		}
	}
	if len(forgotten) > 0 {
		if _, err := s.pool.Exec(ctx, `DELETE FROM config_meters WHERE key = ANY($1)
			AND NOT EXISTS (SELECT 1 FROM meters WHERE meters.key = config_meters.key)`, forgotten); err != nil {
			return nil, nil, fmt.Errorf("forget meters no longer defined: %w", err)
		}
	}
	if len(differ) > 0 {
		// Only where the other definition's roll-up came after the stored
		// meter's finished backfill (which, since it records its own
		// definition in the same transaction, is never later than it):
		// a backfill that finished before config_meters recorded
		// backfills (an upgrade), or one that another aggregator just
		// recorded, computed the rows under the stored definition already.
		rows, err := s.pool.Query(ctx, `UPDATE meters m SET backfilled_at = NULL, backfill_claim = NULL
			FROM config_meters c
			WHERE c.key = m.key AND m.key = ANY($1) AND m.backfilled_at IS NOT NULL AND c.rolled_up_at > m.backfilled_at
			RETURNING m.key`, differ)
		if err == nil {
			rebackfill, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		if err != nil {
			return nil, nil, fmt.Errorf("backfill again the meters the configuration file no longer shadows: %w", err)
		}
		// Those not backfilled again have their rows under the stored
		// definition: the record says so, or a file meter of the old
		// definition put back later would be taken as up to date.
		if _, err := s.pool.Exec(ctx, `UPDATE config_meters c SET definition = m.definition, rolled_up_at = m.backfilled_at
			FROM meters m
			WHERE c.key = m.key AND m.key = ANY($1) AND m.backfilled_at IS NOT NULL AND c.rolled_up_at <= m.backfilled_at`, differ); err != nil {
			return nil, nil, fmt.Errorf("record the stored meters' rollups as computed under their definitions: %w", err)
		}
	}
	inForce := slices.Clone(storedKeys)
	for _, m := range config {
		inForce = append(inForce, m.Key)
	}
	if err := s.forgetRebuildsOf(ctx, inForce); err != nil {
		return nil, nil, err
	}
	return forgotten, rebackfill, nil
}

// ConfigState tells, for each meter of the configuration file, whether its
// rollups were computed under this definition: fresh ones were, added ones
// were never computed, changed ones were computed under another.
func (s *Meters) ConfigState(ctx context.Context, config []meter.Meter) (added, changed []meter.Meter, err error) {
	rows, err := s.pool.Query(ctx, "SELECT key, definition FROM config_meters")
	if err != nil {
		return nil, nil, fmt.Errorf("read config meters: %w", err)
	}
	defer rows.Close()
	stored := map[string]meter.Meter{}
	for rows.Next() {
		var key string
		var b []byte
		if err := rows.Scan(&key, &b); err != nil {
			return nil, nil, fmt.Errorf("read config meters: %w", err)
		}
		var m meter.Meter
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, nil, fmt.Errorf("stored config meter %s: %w", key, err)
		}
		stored[key] = m
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("read config meters: %w", err)
	}
	for _, m := range config {
		old, ok := stored[m.Key]
		switch {
		case !ok:
			added = append(added, m)
		case !meter.Equal(old, m):
			changed = append(changed, m)
		}
	}
	return added, changed, nil
}

// Unfinished returns the keys of the meters whose past is still being
// rolled up: stored meters whose backfill is not recorded finished (unless
// the configuration file defines their key), the configuration file's
// meters that ConfigState calls added or changed, and the meters of a
// `tollgate aggregate rebuild` that deleted rows and has not recorded them
// rebuilt (running, or killed).
func (s *Meters) Unfinished(ctx context.Context, config []meter.Meter) (map[string]bool, error) {
	out := map[string]bool{}
	rows, err := s.pool.Query(ctx, "SELECT key FROM meters WHERE backfilled_at IS NULL")
	if err != nil {
		return nil, fmt.Errorf("read meters' backfill state: %w", err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read meters' backfill state: %w", err)
	}
	for _, k := range keys {
		out[k] = true
	}
	for _, m := range config {
		delete(out, m.Key)
	}
	added, changed, err := s.ConfigState(ctx, config)
	if err != nil {
		return nil, err
	}
	for _, m := range append(added, changed...) {
		out[m.Key] = true
	}
	// A rebuild under way, or one that deleted rows and never finished.
	pending, err := s.PendingRebuilds(ctx)
	if err != nil {
		return nil, err
	}
	for _, p := range pending {
		for _, k := range p.Meters {
			out[k] = true
		}
	}
	return out, nil
}

// PendingRebuild is a `tollgate aggregate rebuild` that deleted rollups
// and has not recorded them rebuilt (RebuildStarting).
type PendingRebuild struct {
	ID        uuid.UUID
	Meters    []string
	From, To  time.Time
	StartedAt time.Time
}

// RebuildStarting records, before a rebuild deletes the rollups of meters
// for the windows starting in [from, to), that it is about to, and returns
// when it started by Postgres's clock (for RebuildFinished).
func (s *Meters) RebuildStarting(ctx context.Context, id uuid.UUID, meters []string, from, to time.Time) (time.Time, error) {
	var started time.Time
	err := s.pool.QueryRow(ctx, `INSERT INTO rollup_rebuilds (id, meters, from_start, to_start) VALUES ($1, $2, $3, $4)
		ON CONFLICT (id) DO UPDATE SET meters = EXCLUDED.meters, from_start = EXCLUDED.from_start, to_start = EXCLUDED.to_start
		RETURNING started_at`, id, meters, from, to).Scan(&started)
	if err != nil {
		return time.Time{}, fmt.Errorf("record the rebuild before its deletion: %w", err)
	}
	return started, nil
}

// RebuildFinished removes the record of rebuild id, and settles what it
// rebuilt in the records of rebuilds that started before it (a later one,
// still running, may delete its rows after this one rebuilt them): a
// record whose range lies within [from, to) loses the meters rebuilt here,
// and goes once it has none left. So running again the rebuild a killed
// one left behind settles it, whole or meter by meter.
//
// started is when the rebuild started (RebuildStarting's answer), which
// its own record may no longer say: a rebuild that started later and
// finished first settles it.
func (s *Meters) RebuildFinished(ctx context.Context, id uuid.UUID, started time.Time, meters []string, from, to time.Time) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("record the rebuild finished: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit, a no-op
	if _, err := tx.Exec(ctx, `UPDATE rollup_rebuilds
		SET meters = ARRAY(SELECT k FROM unnest(meters) k WHERE NOT k = ANY($2))
		WHERE id <> $1 AND from_start >= $3 AND to_start <= $4 AND started_at <= $5`,
		id, meters, from, to, started); err != nil {
		return fmt.Errorf("record the rebuild finished: %w", err)
	}
	if _, err := tx.Exec(ctx, "DELETE FROM rollup_rebuilds WHERE id = $1 OR cardinality(meters) = 0", id); err != nil {
		return fmt.Errorf("record the rebuild finished: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("record the rebuild finished: %w", err)
	}
	return nil
}

// forgetRebuildsOf removes from the pending rebuilds' records the meters
// no meter in force defines any longer (inForce are the keys that are):
// their rows are no one's to rebuild, and `aggregate rebuild` refuses
// their keys. A record with none left goes.
func (s *Meters) forgetRebuildsOf(ctx context.Context, inForce []string) error {
	if _, err := s.pool.Exec(ctx, `UPDATE rollup_rebuilds SET meters = ARRAY(SELECT k FROM unnest(meters) k WHERE k = ANY($1))
		WHERE NOT meters <@ $1`, inForce); err != nil {
		return fmt.Errorf("forget the rebuilds of meters no longer defined: %w", err)
	}
	if _, err := s.pool.Exec(ctx, "DELETE FROM rollup_rebuilds WHERE cardinality(meters) = 0"); err != nil {
		return fmt.Errorf("forget the rebuilds of meters no longer defined: %w", err)
	}
	return nil
}

// PendingRebuilds lists the rebuilds that deleted rollups and never
// recorded them rebuilt, oldest first.
func (s *Meters) PendingRebuilds(ctx context.Context) ([]PendingRebuild, error) {
	rows, err := s.pool.Query(ctx, "SELECT id, meters, from_start, to_start, started_at FROM rollup_rebuilds ORDER BY started_at, id")
	if err != nil {
		return nil, fmt.Errorf("read pending rebuilds: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (PendingRebuild, error) {
		var p PendingRebuild
		err := r.Scan(&p.ID, &p.Meters, &p.From, &p.To, &p.StartedAt)
		return p, err
	})
	if err != nil {
		return nil, fmt.Errorf("read pending rebuilds: %w", err)
	}
	return out, nil
}

// ConfigRolledUp records that m's rollups are now computed under its
// definition.
func (s *Meters) ConfigRolledUp(ctx context.Context, m meter.Meter) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode meter: %w", err)
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO config_meters (key, definition) VALUES ($1, $2)
		ON CONFLICT (key) DO UPDATE SET definition = EXCLUDED.definition, rolled_up_at = now()`, m.Key, b)
	if err != nil {
		return fmt.Errorf("record config meter %s: %w", m.Key, err)
	}
	return nil
}

// SpoolHolds reads the edges' spool holds (edge_spool_holds) for the usage
// API's complete_through. It never changes a row: the invoicer retires
// released holds once the watermark has passed them.
type SpoolHolds struct {
	pool *pgxpool.Pool
}

var _ aggregator.SpoolHolds = (*SpoolHolds)(nil)

// NewSpoolHolds returns a SpoolHolds over pool.
func NewSpoolHolds(pool *pgxpool.Pool) *SpoolHolds { return &SpoolHolds{pool: pool} }

// SpoolHolds lists every hold, released or not.
func (s *SpoolHolds) SpoolHolds(ctx context.Context) ([]schemas.SpoolHold, error) {
	rows, err := s.pool.Query(ctx, "SELECT instance, since, released_at FROM edge_spool_holds ORDER BY since")
	if err != nil {
		return nil, fmt.Errorf("read spool holds: %w", err)
	}
	defer rows.Close()
	var out []schemas.SpoolHold
	for rows.Next() {
		var h schemas.SpoolHold
		var released *time.Time
		if err := rows.Scan(&h.Instance, &h.Since, &released); err != nil {
			return nil, fmt.Errorf("read spool holds: %w", err)
		}
		if released != nil {
			h.Released = *released
		}
		out = append(out, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read spool holds: %w", err)
	}
	return out, nil
}

// Rezones tracks the accounts whose time zone changed since their rollups
// were last re-rolled onto their zone's grid (migration 00120).
type Rezones struct {
	pool *pgxpool.Pool
}

// NewRezones returns a Rezones over pool.
func NewRezones(pool *pgxpool.Pool) *Rezones { return &Rezones{pool: pool} }

// Owed is an account whose rollups are owed a rezone: its zone changed at
// ChangedAt (by Postgres's clock), to Zone. FirstPassAgo is how long ago
// the rezone's first pass finished, by Postgres's clock; nil before it has.
type Owed struct {
	Account      string
	Zone         string
	ChangedAt    time.Time
	FirstPassAgo *time.Duration
}

// Owed lists the accounts owed a rezone, in id order.
func (r *Rezones) Owed(ctx context.Context) ([]Owed, error) {
	rows, err := r.pool.Query(ctx, `SELECT id, timezone, timezone_changed_at,
			CASE WHEN rollups_first_pass_for = timezone_changed_at
				THEN extract(epoch FROM now() - rollups_first_pass_at)::float8 END
		FROM accounts
		WHERE timezone_changed_at IS NOT NULL AND timezone_changed_at IS DISTINCT FROM rollups_rezoned_for
		ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list accounts owed a rezone: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Owed, error) {
		var o Owed
		var ago *float64
		if err := row.Scan(&o.Account, &o.Zone, &o.ChangedAt, &ago); err != nil {
			return o, err
		}
		if ago != nil {
			d := time.Duration(*ago * float64(time.Second))
			o.FirstPassAgo = &d
		}
		return o, nil
	})
	if err != nil {
		return nil, fmt.Errorf("list accounts owed a rezone: %w", err)
	}
	return out, nil
}

// Rezoning is the set of accounts owed a rezone (aggregator.Rezones).
func (r *Rezones) Rezoning(ctx context.Context) (map[string]bool, error) {
	rows, err := r.pool.Query(ctx, `SELECT id FROM accounts
		WHERE timezone_changed_at IS NOT NULL AND timezone_changed_at IS DISTINCT FROM rollups_rezoned_for`)
	if err != nil {
		return nil, fmt.Errorf("list accounts owed a rezone: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list accounts owed a rezone: %w", err)
	}
	out := make(map[string]bool, len(ids))
	for _, id := range ids {
		out[id] = true
	}
	return out, nil
}

// Lock takes account's rezone for this process, on a connection of its
// own: two aggregators rezoning one account at once could each delete
// rows the other has rebuilt. ok is false when another holds it. The lock
// goes with the connection, so a process that dies lets it go; Done
// records the rezone on the same connection and lets it go.
func (r *Rezones) Lock(ctx context.Context, account string) (*RezoneLock, bool, error) {
	c, err := r.pool.Acquire(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("lock account %s's rezone: %w", account, err)
	}
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext('tollgate rezone ' || $1))", account).Scan(&ok); err != nil {
		c.Release()
		return nil, false, fmt.Errorf("lock account %s's rezone: %w", account, err)
	}
	if !ok {
		c.Release()
		return nil, false, nil
	}
	return &RezoneLock{conn: c, account: account}, true, nil
}

// RezoneLock is one account's rezone, held.
type RezoneLock struct {
	conn    *pgxpool.Conn
	account string
}

// Owed tells whether the account is still owed a rezone for its change at
// changedAt, and whether its first pass has been run: owed is false when
// another process finished it before this one took the lock, or when the
// zone changed again since (that change has its own wait).
func (l *RezoneLock) Owed(ctx context.Context, changedAt time.Time) (owed, firstPassRun bool, err error) {
	err = l.conn.QueryRow(ctx, `SELECT
			timezone_changed_at = $2 AND rollups_rezoned_for IS DISTINCT FROM timezone_changed_at,
			rollups_first_pass_for IS NOT DISTINCT FROM timezone_changed_at
		FROM accounts WHERE id = $1`, l.account, changedAt).Scan(&owed, &firstPassRun)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("check account %s's rezone: %w", l.account, err)
	}
	return owed, firstPassRun, nil
}

// FirstPassRun records that the first pass of the rezone for the change at
// changedAt has run.
func (l *RezoneLock) FirstPassRun(ctx context.Context, changedAt time.Time) error {
	if _, err := l.conn.Exec(ctx, `UPDATE accounts SET rollups_first_pass_for = $2, rollups_first_pass_at = now()
		WHERE id = $1 AND timezone_changed_at = $2`, l.account, changedAt); err != nil {
		return fmt.Errorf("record account %s's first rezone pass: %w", l.account, err)
	}
	return nil
}

// Done records that the rollups were rezoned for the change at changedAt.
// A later change stays owed.
func (l *RezoneLock) Done(ctx context.Context, changedAt time.Time) error {
	if _, err := l.conn.Exec(ctx, "UPDATE accounts SET rollups_rezoned_for = $2, rollups_rezoned_at = now() WHERE id = $1", l.account, changedAt); err != nil {
		return fmt.Errorf("record account %s's rezone: %w", l.account, err)
	}
	return nil
}

// Release lets the rezone go. A connection that cannot be unlocked is
// closed, which lets it go too.
func (l *RezoneLock) Release() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := l.conn.Exec(ctx, "SELECT pg_advisory_unlock(hashtext('tollgate rezone ' || $1))", l.account); err != nil {
		_ = l.conn.Conn().Close(ctx)
	}
	l.conn.Release()
}
