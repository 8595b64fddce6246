-- Raw usage events: one row per event id, immutable.
--
-- Effectively once: the sorting key ends with event_id, and every column
-- before it (account, environment, type, time) is fixed when the edge assigns
-- the id, so a redelivered event has the same sorting key. ReplacingMergeTree
-- collapses such rows when parts merge; readers that need an exact count
-- before a merge read with FINAL (or go through the rollups, which ingest
-- feeds only with ids it has not landed before). Partitions are months of
-- the event time, so a duplicate always lands in the same partition as its
-- original, which ReplacingMergeTree requires.
--
-- Per-account time-range queries read a narrow range of the primary key:
-- (account_id, environment, event_type, timestamp).
--
-- Granules of 2,048 rows instead of ClickHouse's 8,192: a rollup round
-- recomputes each touched minute from the raw rows, and reads whole
-- granules of every part that holds one, many of them small recent parts
-- where a granule spans several accounts. In bench-ingest (2,000,000
-- events) the minute recomputes read 3.0 million raw rows per run instead
-- of 4.3 to 5.7 million, and ingest ran at 215,000 to 228,000 events/s
-- instead of 175,000 to 200,000 in alternating runs (docs/ingest.md). The index held in memory
-- grows fourfold: about 35 MB per billion rows. ClickHouse cannot change
-- the setting of an existing table; one created before it keeps 8,192 and
-- is only slower.
--
-- Written for ClickHouse 18.16 and current releases alike: no DateTime64
-- (sub-second precision is timestamp_us), no Map (dimensions are two
-- key-sorted parallel arrays), no LowCardinality, no TTL.
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id        UUID,
    schema_version  UInt8,
    account_id      String,
    environment     Enum8('live' = 1, 'test' = 2),
    key_id          String,
    event_type      String,
    timestamp       DateTime('UTC'),
    timestamp_us    UInt64,
    route           String,
    method          String,
    status          UInt16,
    latency_us      UInt64,
    request_bytes   UInt64,
    response_bytes  UInt64,
    units           Int64,
    request_id      String,
    client_id       String,
    dim_keys        Array(String),
    dim_values      Array(String),
    kafka_partition Int32,
    kafka_offset    Int64,
    ingested_at     DateTime('UTC')
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (account_id, environment, event_type, timestamp, event_id)
SETTINGS index_granularity = 2048
