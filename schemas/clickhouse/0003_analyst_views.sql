-- Views for analysts who query ClickHouse directly. Each reads through
-- FINAL, so the numbers are exact at any moment, not only after background
-- merges. ClickHouse 18.16 does not push a query's WHERE into a view (not
-- even with enable_optimize_predicate_expression), so every query through
-- one reads and deduplicates the whole table: they are for quick looks.
-- The worked examples in docs/usage-api.md query the tables with FINAL and
-- the filters inline, which reads only the key range asked for.

-- Every distinct usage event, once.
CREATE VIEW IF NOT EXISTS usage_events_exact AS
SELECT *
FROM usage_events FINAL;

-- Rolled-up usage, one row per account, environment, meter, granularity,
-- window and group; group_values = [] is the meter's total for the window.
CREATE VIEW IF NOT EXISTS usage_by_window AS
SELECT
    account_id,
    environment,
    meter,
    granularity,
    window_start,
    group_values,
    value,
    events,
    computed_at
FROM usage_rollups FINAL;

-- Daily totals per account and meter (days in the account's time zone).
-- window_start is the local day's start as an instant; day_utc is its UTC
-- date, which east of UTC is the day before the local date. Label local
-- days with toDate(window_start, '<the account's zone>').
CREATE VIEW IF NOT EXISTS usage_daily_totals AS
SELECT
    account_id,
    environment,
    meter,
    toDate(window_start) AS day_utc,
    window_start,
    value
FROM usage_rollups FINAL
WHERE granularity = 'day' AND empty(group_values);

-- The landed watermark: every event Kafka holds with an event time up to
-- complete_through has landed. Despite the name it is not the invoicer's
-- gate: events an edge spooled while Kafka was unreachable are not in Kafka
-- yet, and their holds are in Postgres (edge_spool_holds), which ClickHouse
-- cannot see. The usage API's complete_through is capped by those holds.
CREATE VIEW IF NOT EXISTS usage_complete_through AS
SELECT min(watermark) AS complete_through, count() AS partitions
FROM watermarks FINAL;

-- Events refused for arriving later than the allowed lateness.
CREATE VIEW IF NOT EXISTS late_events_exact AS
SELECT *
FROM late_events FINAL;
