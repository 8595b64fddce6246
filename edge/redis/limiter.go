// Package redis shares the edge's rate limits and monthly quotas between
// every edge instance through Redis.
package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
)

// Limiter is GCRA (redis_rate) for rate limits and an atomic counter per
// account and calendar month for quotas.
type Limiter struct {
	rdb  redis.UniversalClient
	gcra *redis_rate.Limiter
}

var (
	_ edge.RateLimiter  = (*Limiter)(nil)
	_ edge.QuotaCounter = (*Limiter)(nil)
	_ edge.CallLimiter  = (*Limiter)(nil)
)

// gcraPrefix is redis_rate's key prefix: AllowCall and Allow share buckets.
const gcraPrefix = "rate:"

// NewLimiter uses rdb for every counter.
func NewLimiter(rdb redis.UniversalClient) *Limiter {
	return &Limiter{rdb: rdb, gcra: redis_rate.NewLimiter(rdb)}
}

// Allow implements edge.RateLimiter with GCRA: rps per second, burst at once.
func (l *Limiter) Allow(ctx context.Context, id string, rps, burst int) (edge.RateResult, error) {
	r, err := l.gcra.Allow(ctx, id, redis_rate.Limit{Rate: rps, Burst: burst, Period: time.Second})
	if err != nil {
		return edge.RateResult{}, fmt.Errorf("redis rate limit: %w", err)
	}
	return edge.RateResult{
		Allowed:    r.Allowed > 0,
		Limit:      burst,
		Remaining:  r.Remaining,
		RetryAfter: max(0, r.RetryAfter),
		ResetAfter: max(0, r.ResetAfter),
	}, nil
}

// take counts one call unless that would pass the limit (negative = none).
var take = redis.NewScript(`
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
local limit = tonumber(ARGV[1])
if limit >= 0 and n > limit then
  redis.call('DECR', KEYS[1])
  return {0, n - 1}
end
return {1, n}
`)

// Take implements edge.QuotaCounter.
func (l *Limiter) Take(ctx context.Context, bucket string, limit int64, ttl time.Duration) (int64, bool, error) {
	v, err := take.Run(ctx, l.rdb, []string{bucket}, limit, int64(ttl.Seconds())+1).Int64Slice()
	if err != nil {
		return 0, false, fmt.Errorf("redis quota: %w", err)
	}
	return v[1], v[0] == 1, nil
}

// allowCall is redis_rate's GCRA (allowN with cost 1, the same arithmetic,
// keys and stored values) over each bucket in turn, stopping at the first
// refusal, then take's quota count if every bucket allowed the call: one
// round trip per call instead of one per bucket plus one for the quota.
// KEYS: the buckets, then the quota counter when ARGV[4] is "1".
// ARGV: burst, rate, period (s), with quota, quota limit, quota expiry (s).
// Returns four values per bucket checked (allowed, remaining, retry_after,
// reset_after, as redis_rate), then (allowed, count) for the quota.
var allowCall = redis.NewScript(`
redis.replicate_commands()
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local with_quota = ARGV[4] == "1"
local buckets = #KEYS
if with_quota then buckets = buckets - 1 end

local emission_interval = period / rate
local burst_offset = emission_interval * burst
local jan_1_2017 = 1483228800
local now = redis.call("TIME")
now = (now[1] - jan_1_2017) + (now[2] / 1000000)

local out = {}
for i = 1, buckets do
  local tat = redis.call("GET", KEYS[i])
  if not tat then
    tat = now
  else
    tat = tonumber(tat)
  end
  tat = math.max(tat, now)
  local new_tat = tat + emission_interval
  local diff = now - (new_tat - burst_offset)
  local remaining = diff / emission_interval
  if remaining < 0 then
    table.insert(out, 0)
    table.insert(out, 0)
    table.insert(out, tostring(diff * -1))
    table.insert(out, tostring(tat - now))
    return out
  end
  local reset_after = new_tat - now
  if reset_after > 0 then
    redis.call("SET", KEYS[i], new_tat, "EX", math.ceil(reset_after))
  end
  table.insert(out, 1)
  table.insert(out, remaining)
  table.insert(out, "-1")
  table.insert(out, tostring(reset_after))
end

if with_quota then
  local q = KEYS[buckets + 1]
  local n = redis.call("INCR", q)
  if n == 1 then redis.call("EXPIRE", q, ARGV[6]) end
  local limit = tonumber(ARGV[5])
  if limit >= 0 and n > limit then
    redis.call("DECR", q)
    table.insert(out, 0)
    table.insert(out, n - 1)
  else
    table.insert(out, 1)
    table.insert(out, n)
  end
end
return out
`)

// AllowCall implements edge.CallLimiter in one script run. A cluster client
// cannot run one script over keys in different slots, so it goes step by
// step there.
func (l *Limiter) AllowCall(ctx context.Context, c edge.CallLimits) (edge.CallResult, error) {
	if _, cluster := l.rdb.(*redis.ClusterClient); cluster {
		return edge.AllowCallEach(ctx, l, l, c)
	}
	keys := make([]string, 0, len(c.Buckets)+1)
	for _, id := range c.Buckets {
		keys = append(keys, gcraPrefix+id)
	}
	withQuota := 0
	if c.QuotaBucket != "" {
		keys = append(keys, c.QuotaBucket)
		withQuota = 1
	}
	v, err := allowCall.Run(ctx, l.rdb, keys, c.Burst, c.RPS, 1, withQuota, c.QuotaLimit, int64(c.QuotaTTL.Seconds())+1).Slice()
	if err != nil {
		return edge.CallResult{}, fmt.Errorf("redis call limits: %w", err)
	}
	res, err := parseCall(v, c)
	if err != nil {
		return edge.CallResult{}, fmt.Errorf("redis call limits: %w", err)
	}
	return res, nil
}

var errReply = errors.New("unexpected script reply")

func parseCall(v []any, c edge.CallLimits) (edge.CallResult, error) {
	res := edge.CallResult{Rates: make([]edge.RateResult, 0, len(c.Buckets))}
	for len(v) >= 4 && len(res.Rates) < len(c.Buckets) {
		allowed, ok1 := v[0].(int64)
		remaining, ok2 := v[1].(int64)
		retry, ok3 := v[2].(string)
		reset, ok4 := v[3].(string)
		if !ok1 || !ok2 || !ok3 || !ok4 {
			return res, errReply
		}
		retryAfter, err := seconds(retry)
		if err != nil {
			return res, err
		}
		resetAfter, err := seconds(reset)
		if err != nil {
			return res, err
		}
		res.Rates = append(res.Rates, edge.RateResult{
			Allowed:    allowed > 0,
			Limit:      c.Burst,
			Remaining:  int(remaining),
			RetryAfter: retryAfter,
			ResetAfter: resetAfter,
		})
		v = v[4:]
		if allowed == 0 {
			return res, nil
		}
	}
	if c.QuotaBucket == "" {
		return res, nil
	}
	if len(v) != 2 {
		return res, errReply
	}
	allowed, ok1 := v[0].(int64)
	used, ok2 := v[1].(int64)
	if !ok1 || !ok2 {
		return res, errReply
	}
	res.QuotaChecked, res.QuotaUsed, res.QuotaAllowed = true, used, allowed == 1
	return res, nil
}

// seconds converts the script's seconds to a duration as Allow does
// (redis_rate's -1 "not applicable" becomes 0).
func seconds(s string) (time.Duration, error) {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, fmt.Errorf("parse seconds %q: %w", s, err)
	}
	if f == -1 {
		return 0, nil
	}
	return max(0, time.Duration(f*float64(time.Second))), nil
}
