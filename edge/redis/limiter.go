// Package redis shares the edge's rate limits and monthly quotas between
// every edge instance through Redis.
package redis

import (
	"context"
	"fmt"
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
)

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
