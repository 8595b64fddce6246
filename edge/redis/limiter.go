// Package redis shares the edge's rate limits and monthly quotas between
// every edge instance through Redis.
package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/tollgate-dev/tollgate/edge"
)

// Limiter is GCRA (redis_rate) for rate limits and an atomic counter per
// account and calendar month for quotas.
//
// Concurrent calls' AllowCall scripts are pipelined. A call that finds
// fewer than maxSenders pipelines in flight sends one itself, taking along
// every call queued behind it; the others queue, and when a sender is done
// it hands the job to the first call still queued. Each script still runs
// on its own and atomically, so the answers are the ones separate round
// trips would give; what changes is the system calls on both sides, which
// under load are most of what a call costs Redis and the edge. A call that
// finds a sender free goes at once, from its own goroutine, so at low load
// nothing is added to its latency.
type Limiter struct {
	rdb  redis.UniversalClient
	gcra *redis_rate.Limiter

	mu      sync.Mutex
	queue   []*callRequest
	sending int
	// sent counts pipelines written; scripts counts the calls they carried.
	sent, scripts atomic.Uint64
}

type callRequest struct {
	keys  []string
	args  []any
	reply chan callReply
}

// callReply is a call's answer, or (lead) the job of sending the queue.
type callReply struct {
	v    []any
	err  error
	lead bool
}

const (
	// maxSenders bounds the pipelines in flight at once.
	maxSenders = 2
	// maxPipeline bounds one pipeline's calls.
	maxPipeline = 256
)

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

// Pipelined reports how many pipelines carried how many AllowCall scripts.
func (l *Limiter) Pipelined() (pipelines, scripts uint64) { return l.sent.Load(), l.scripts.Load() }

// pipelined runs allowCall for one call, in a pipeline with whatever other
// calls are waiting. The wait is bounded by the Redis client's read and
// write timeouts, which bound every pipeline.
func (l *Limiter) pipelined(keys []string, args ...any) ([]any, error) {
	r := &callRequest{keys: keys, args: args, reply: make(chan callReply, 1)}
	l.mu.Lock()
	if l.sending < maxSenders {
		l.sending++
		l.sendFrom(r)
	} else {
		l.queue = append(l.queue, r)
		l.mu.Unlock()
		if rep := <-r.reply; !rep.lead {
			return rep.v, rep.err
		}
		l.mu.Lock()
		l.sendFrom(r)
	}
	rep := <-r.reply
	return rep.v, rep.err
}

// sendFrom is called with l.mu held by a call that holds a sender slot: it
// sends that call and the queue behind it, then passes the slot on to the
// first call queued meanwhile, or frees it.
func (l *Limiter) sendFrom(first *callRequest) {
	n := min(len(l.queue), maxPipeline-1)
	batch := make([]*callRequest, 0, n+1)
	batch = append(append(batch, first), l.queue[:n]...)
	l.queue = l.queue[n:]
	l.mu.Unlock()

	l.run(batch)

	l.mu.Lock()
	if len(l.queue) == 0 {
		l.sending--
		l.mu.Unlock()
		return
	}
	next := l.queue[0]
	l.queue = l.queue[1:]
	l.mu.Unlock()
	next.reply <- callReply{lead: true}
}

// run sends one pipeline and answers each call in it.
func (l *Limiter) run(batch []*callRequest) {
	ctx := context.Background()
	cmds := make([]*redis.Cmd, 0, len(batch))
	if len(batch) == 1 {
		cmds = append(cmds, l.rdb.EvalSha(ctx, allowCall.Hash(), batch[0].keys, batch[0].args...))
	} else {
		_, _ = l.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, r := range batch {
				cmds = append(cmds, p.EvalSha(ctx, allowCall.Hash(), r.keys, r.args...))
			}
			return nil
		})
	}
	l.sent.Add(1)
	l.scripts.Add(uint64(len(batch)))
	for i, r := range batch {
		cmd := cmds[i]
		if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
			// Redis restarted or its script cache was flushed: Run loads
			// the script again.
			cmd = allowCall.Run(ctx, l.rdb, r.keys, r.args...)
		}
		v, err := cmd.Slice()
		r.reply <- callReply{v: v, err: err}
	}
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
	v, err := l.pipelined(keys, c.Burst, c.RPS, 1, withQuota, c.QuotaLimit, int64(c.QuotaTTL.Seconds())+1)
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
