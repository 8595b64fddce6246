// Package redis shares the edge's rate limits and monthly quotas between
// every edge instance through Redis.
package redis

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
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
// Concurrent calls' AllowCall decisions are batched: one script run
// decides every call in a batch, in order, each exactly as it would be
// decided alone. A call that finds fewer than maxSenders batches in flight
// sends one itself, taking along every call queued behind it; the others
// queue, and when a sender is done it hands the job to the first call
// still queued. What batching saves is the system calls on both sides and
// Redis's per-script cost, which under load are most of what a call costs
// Redis and the edge. A call that finds a sender free goes at once, from
// its own goroutine, so at low load nothing is added to its latency.
type Limiter struct {
	rdb  redis.UniversalClient
	gcra *redis_rate.Limiter

	mu      sync.Mutex
	queue   []*callRequest
	sending int
	// sent counts script runs; decided counts the calls they decided.
	sent, decided atomic.Uint64

	// leases holds a *lease per set of limits (lease.go).
	leases   sync.Map
	sweeping atomic.Bool
	// returning is set by ReturnLeases: no more asking ahead.
	returning atomic.Bool
	// lastSweep is when the latest sweep of idle leases began (Unix ns).
	lastSweep atomic.Int64
	// sweptServed counts the calls decided from leases since swept (the
	// rest are counted by the leases themselves); refunded counts the
	// tokens given back, refundErrs the failed refunds.
	sweptServed, refunded, refundErrs atomic.Uint64

	// refunds tracks the refunds in flight and the lost grants (lease.go).
	refunds refunds

	// instance and grants name each lease grant's record (recordKey).
	instance string
	grants   atomic.Uint64
	// queueWait bounds a call's wait in the queue: the client's read
	// timeout.
	queueWait time.Duration
}

// readTimeout is rdb's read timeout (go-redis's default, 3 s, when its
// options do not say).
func readTimeout(rdb redis.UniversalClient) time.Duration {
	var d time.Duration
	switch c := rdb.(type) {
	case *redis.Client:
		d = c.Options().ReadTimeout
	case *redis.ClusterClient:
		d = c.Options().ReadTimeout
	}
	if d <= 0 {
		d = 3 * time.Second
	}
	return d
}

type callRequest struct {
	keys []string
	args []any
	// ahead marks a lease asked for ahead of need, not for a call.
	ahead bool
	reply chan callReply
}

// callReply is a call's answer, or (lead) the job of sending the queue.
type callReply struct {
	v    []any
	err  error
	lead bool
}

const (
	// maxSenders bounds the batches in flight at once.
	maxSenders = 2
	// maxBatch bounds one batch's calls.
	maxBatch = 256
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
	var id [8]byte
	_, _ = rand.Read(id[:]) // never fails (crypto/rand)
	return &Limiter{rdb: rdb, gcra: redis_rate.NewLimiter(rdb), instance: hex.EncodeToString(id[:]), queueWait: readTimeout(rdb)}
}

// recordKey names the record of a new lease grant on the limits whose first
// key is first, in that key's namespace: the instance's random id and a
// count make it unique across instances and restarts.
func (l *Limiter) recordKey(first string) string {
	return first + ":lease:" + l.instance + ":" + strconv.FormatUint(l.grants.Add(1), 36)
}

// Batched reports how many script runs decided how many AllowCall calls
// (leases asked for ahead of need are not calls).
func (l *Limiter) Batched() (runs, calls uint64) { return l.sent.Load(), l.decided.Load() }

// Leased reports how many AllowCall calls were decided from a lease
// without a round trip, and how many leased tokens went back unused.
func (l *Limiter) Leased() (calls, refunded uint64) {
	calls = l.sweptServed.Load()
	l.leases.Range(func(_, v any) bool {
		le := v.(*lease)
		le.mu.Lock()
		calls += le.served
		le.mu.Unlock()
		return true
	})
	return calls, l.refunded.Load()
}

// ReturnErrors counts the failed attempts to give leased tokens back; the
// tokens of each stay counted until their buckets refill (and, for the
// quota, until the month ends).
func (l *Limiter) ReturnErrors() uint64 { return l.refundErrs.Load() }

// errNotSent marks the error of a call that never left the queue: it
// cannot have run, so no grant of it is given back (mayHaveRun).
var errNotSent = errors.New("not sent to redis")

// ErrQueueWait is a call that waited longer than the Redis client's read
// timeout for a batch to take it: Redis answers more slowly than calls
// come. The call was not sent, so the fallback decides it.
var ErrQueueWait = fmt.Errorf("redis limits: waited too long for a batch to take the call (Redis is slow): %w", errNotSent)

// batched decides one call, in a batch with whatever other calls are
// waiting. A batch in flight is bounded by the Redis client's read and
// write timeouts, which bound every script run; a call still queued when
// the read timeout has passed leaves the queue unsent (ErrQueueWait), and
// every call queued behind a batch that failed is failed with it, so a
// slow or silent Redis costs a call one timeout at most, not one per
// batch ahead of it.
func (l *Limiter) batched(ahead bool, keys []string, args ...any) ([]any, error) {
	r := &callRequest{keys: keys, args: args, ahead: ahead, reply: make(chan callReply, 1)}
	l.mu.Lock()
	if l.sending < maxSenders {
		l.sending++
		l.sendFrom(r)
	} else {
		l.queue = append(l.queue, r)
		l.mu.Unlock()
		timer := time.NewTimer(l.queueWait)
		var rep callReply
		select {
		case rep = <-r.reply:
			timer.Stop()
		case <-timer.C:
			l.mu.Lock()
			if i := slices.Index(l.queue, r); i >= 0 {
				l.queue = slices.Delete(l.queue, i, i+1)
				l.mu.Unlock()
				return nil, ErrQueueWait
			}
			l.mu.Unlock()
			// Taken into a batch, or handed the sender's slot, meanwhile.
			rep = <-r.reply
		}
		if !rep.lead {
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
	n := min(len(l.queue), maxBatch-1)
	batch := make([]*callRequest, 0, n+1)
	batch = append(append(batch, first), l.queue[:n]...)
	l.queue = l.queue[n:]
	l.mu.Unlock()

	failed := l.run(batch)

	l.mu.Lock()
	if failed != nil && len(l.queue) > 0 {
		// Redis did not answer this batch: the calls queued behind it
		// would each wait for another timeout. They fail now, and the
		// fallback decides them.
		queued := l.queue
		l.queue = nil
		l.sending--
		l.mu.Unlock()
		err := fmt.Errorf("%w (a batch ahead failed: %w)", errNotSent, failed)
		for _, r := range queued {
			r.reply <- callReply{err: err}
		}
		return
	}
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

// run answers every call in batch with one run of allowCalls, which
// decides them in order, each as it would be decided alone. It returns the
// error that failed the whole batch, if one did.
func (l *Limiter) run(batch []*callRequest) error {
	ctx := context.Background()
	var nkeys, nargs int
	for _, r := range batch {
		nkeys += len(r.keys)
		nargs += len(r.args) + 1
	}
	keys := make([]string, 0, nkeys)
	args := make([]any, 0, nargs+1)
	args = append(args, len(batch))
	for _, r := range batch {
		keys = append(keys, r.keys...)
		args = append(args, len(r.keys))
		args = append(args, r.args...)
	}
	v, err := allowCalls.EvalSha(ctx, l.rdb, keys, args...).Slice()
	if redis.HasErrorPrefix(err, "NOSCRIPT") {
		// Redis restarted or its script cache was flushed: Run loads the
		// script again.
		v, err = allowCalls.Run(ctx, l.rdb, keys, args...).Slice()
	}
	l.sent.Add(1)
	for _, r := range batch {
		if !r.ahead {
			l.decided.Add(1)
		}
	}
	if err == nil && len(v) != len(batch) {
		err = fmt.Errorf("%w: %d answers for %d calls", errReply, len(v), len(batch))
	}
	for i, r := range batch {
		if err != nil {
			r.reply <- callReply{err: err}
			continue
		}
		switch a := v[i].(type) {
		case []any:
			r.reply <- callReply{v: a}
		case error:
			// One call's keys failed (say, a key of the wrong type); the
			// others in the batch are answered as usual.
			r.reply <- callReply{err: fmt.Errorf("%w: %w", edge.ErrLimitState, a)}
		default:
			r.reply <- callReply{err: errReply}
		}
	}
	return err
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

// AddQuota implements edge.QuotaAdder: it counts n calls the edge's local
// fallback allowed while Redis was out of reach in bucket, so the month's
// count holds them. A counter it creates (Redis lost the month's) expires
// after ttl, as take's do. Beside the counter a hash ({bucket}:settled, in
// the counter's cluster slot, kept as long as the counter may be) holds
// the last batch number taken from each sender: a batch sent again after
// its reply was lost adds nothing, and the hash holds one field per edge
// process, not one key per batch.
func (l *Limiter) AddQuota(ctx context.Context, bucket, sender string, seq uint64, n int64, ttl time.Duration) (int64, error) {
	if sender == "" || seq == 0 {
		return 0, errors.New("redis quota: an add needs its sender and batch number")
	}
	count, err := addQuota.Run(ctx, l.rdb, []string{bucket, settledKey(bucket)}, n, int64(ttl.Seconds())+1, sender, seq).Int64()
	if err != nil {
		return 0, fmt.Errorf("redis quota: %w", err)
	}
	return count, nil
}

// settledKey is the hash of bucket's last batch numbers, in bucket's
// cluster slot: a bucket with a hash tag of its own (a rate_limit_prefix
// of "{tollgate}:", which keeps every limit key in one slot) lends it, and
// another is made the tag. (A prefix with a } and no tag, "x{}:" say, has
// no such key: on a cluster, give it a tag.)
func settledKey(bucket string) string {
	if i := strings.IndexByte(bucket, '{'); i >= 0 {
		if j := strings.IndexByte(bucket[i+1:], '}'); j > 0 {
			return bucket + ":settled"
		}
	}
	return "{" + bucket + "}:settled"
}

// addQuota checks the batch number before it writes anything, and records
// it only after the count took the calls: a script's writes stand when a
// later command of it fails (a counter of the wrong type), and a number
// recorded for calls never counted would have their retry add nothing.
var addQuota = redis.NewScript(`
local last = tonumber(redis.call("HGET", KEYS[2], ARGV[3]) or "0")
if tonumber(ARGV[4]) <= last then
  return tonumber(redis.call("GET", KEYS[1]) or "0")
end
local v = redis.call("INCRBY", KEYS[1], ARGV[1])
if redis.call("TTL", KEYS[1]) < 0 then redis.call("EXPIRE", KEYS[1], ARGV[2]) end
redis.call("HSET", KEYS[2], ARGV[3], ARGV[4])
redis.call("EXPIRE", KEYS[2], ARGV[2])
return v
`)

var _ edge.QuotaAdder = (*Limiter)(nil)

// allowCalls decides a batch of calls in order. Each call is redis_rate's
// GCRA (allowN with cost 1: the same arithmetic, keys and stored values)
// over each of its buckets in turn, stopping at the first refusal, then
// take's quota count if every bucket allowed it.
//
// KEYS: each call's keys one call after another: its buckets, then, when
// it has a quota, its quota counter and the counter's lease marker
// (<counter>:leased, set for a second after a grant of more than one call
// takes from the quota).
// ARGV: the number of calls, then for each call its number of keys, burst,
// rate, period (s), with quota ("1" or "0"), quota limit, quota expiry (s),
// tokens wanted, and how long to keep a record of a lease (ms, 0 = none).
// A call that keeps a record has one more key, the record's, after the
// quota's two. A grant writes there what a refund needs to give tokens
// back safely (refundTokens, lease.go): the grant's size, Redis's time, and
// each bucket's arrival time right after the grant.
//
// Returns one array per call: four values per bucket checked (allowed,
// remaining, and retry_after and reset_after in microseconds rounded up,
// else as redis_rate), then (allowed, count) for the quota, allowed being
// 1, 0, or -1 for a refusal while the lease marker stands, then the
// tokens granted; or an error for a call whose keys failed, leaving the
// other calls' answers standing.
var allowCalls = redis.NewScript(`
redis.replicate_commands()
local jan_1_2017 = 1483228800
local now = redis.call("TIME")
now = (now[1] - jan_1_2017) + (now[2] / 1000000)

-- Every key is read at most once and written at most once per run: calls
-- in a batch often share a bucket (a busy key, or any two keys of one
-- account), and the script is atomic, so holding a key's value here
-- between calls and writing the last one leaves Redis as the calls one by
-- one would have. A key's entry: v (its value, nil if absent), set (v was
-- changed), ex (expiry in seconds for the write, or nil to keep the TTL).
local cache = {}
local function load(k)
  local e = cache[k]
  if e then return e end
  local r = redis.pcall("GET", k)
  if type(r) == "table" and r.err then error(r) end
  if r == false then r = nil end
  e = {v = r}
  cache[k] = e
  return e
end

local function decide(first, nkeys, a)
  local burst = tonumber(ARGV[a])
  local rate = tonumber(ARGV[a + 1])
  local period = tonumber(ARGV[a + 2])
  local with_quota = ARGV[a + 3] == "1"
  local want = tonumber(ARGV[a + 6])
  local record_ms = tonumber(ARGV[a + 7])
  local buckets = nkeys
  -- The quota's count, then its lease marker: set for a second after a
  -- grant of more than one call takes from the quota, it tells a refusal
  -- that spare calls may sit in a lease and come back shortly.
  if with_quota then buckets = buckets - 2 end
  if record_ms > 0 then buckets = buckets - 1 end
  local emission_interval = period / rate
  local burst_offset = emission_interval * burst

  -- First see how many tokens every bucket (and the quota) can give, up
  -- to want; nothing is charged unless all of them can give one.
  local out = {}
  local grant = want
  local tats = {}
  for i = first, first + buckets - 1 do
    local e = load(KEYS[i])
    local tat = now
    if e.v then
      tat = tonumber(e.v)
      if not tat then error({err = "ERR rate bucket " .. KEYS[i] .. " does not hold a number"}) end
    end
    tat = math.max(tat, now)
    tats[i] = tat
    -- One token: redis_rate's test, to the same rounding.
    local diff = now - (tat + emission_interval - burst_offset)
    if diff < 0 then
      for j = first, i - 1 do
        local t = tats[j] -- nothing is charged when the call is refused
        local n = #out
        out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, (now - (t - burst_offset)) / emission_interval, -1, math.ceil((t - now) * 1000000)
      end
      local n = #out
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, 0, math.ceil(-diff * 1000000), math.ceil((tat - now) * 1000000)
      out[n + 5] = 0
      return out
    end
    grant = math.min(grant, math.max(1, math.floor((now + burst_offset - tat) / emission_interval)))
  end

  local qe, count
  if with_quota then
    qe = load(KEYS[first + buckets])
    count = 0
    if qe.v then
      count = tonumber(qe.v)
      if not count or count ~= math.floor(count) then error({err = "ERR value is not an integer or out of range"}) end
    end
    local limit = tonumber(ARGV[a + 4])
    if limit >= 0 then
      if count >= limit then
        for j = first, first + buckets - 1 do
          local t = tats[j] -- nothing is charged when the call is refused
          local n = #out
          out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, (now - (t - burst_offset)) / emission_interval, -1, math.ceil((t - now) * 1000000)
        end
        local n = #out
        local refused = 0
        if redis.call("EXISTS", KEYS[first + buckets + 1]) == 1 then refused = -1 end
        out[n + 1], out[n + 2], out[n + 3] = refused, count, 0
        return out
      end
      -- A lease takes at most a quarter of what the month has left (a
      -- call always gets its own): near the end of the quota, the last
      -- calls are not held in one instance's lease while another's
      -- callers are refused.
      grant = math.min(grant, limit - count, math.max(1, math.floor((limit - count) / 4)))
    end
  end

  -- Charge grant tokens to every bucket and the quota.
  for i = first, first + buckets - 1 do
    local e = cache[KEYS[i]]
    local new_tat = tats[i] + grant * emission_interval
    local reset_after = new_tat - now
    if reset_after > 0 then
      e.v, e.set, e.ex = new_tat, true, math.ceil(reset_after)
    end
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, (now - (new_tat - burst_offset)) / emission_interval, -1, math.ceil(reset_after * 1000000)
  end
  if with_quota then
    -- INCRBY with EXPIRE on the first count, as take does.
    if count == 0 then qe.ex = tonumber(ARGV[a + 5]) end
    qe.v, qe.set = count + grant, true
    if grant > 1 then redis.call("SET", KEYS[first + buckets + 1], "1", "PX", 1000) end
    local n = #out
    out[n + 1], out[n + 2] = 1, count + grant
  end
  if record_ms > 0 then
    local rec = {grant, string.format("%.17g", now)}
    for i = first, first + buckets - 1 do
      rec[#rec + 1] = string.format("%.17g", cache[KEYS[i]].v)
    end
    redis.call("SET", KEYS[first + nkeys - 1], table.concat(rec, " "), "PX", record_ms)
  end
  out[#out + 1] = grant
  return out
end

local replies = {}
local first, a = 1, 2
for c = 1, tonumber(ARGV[1]) do
  local nkeys = tonumber(ARGV[a])
  local ok, out = pcall(decide, first, nkeys, a + 1)
  if ok then
    replies[c] = out
  elseif type(out) == "table" and out.err then
    replies[c] = out
  else
    replies[c] = {err = tostring(out)}
  end
  first = first + nkeys
  a = a + 9
end

for k, e in pairs(cache) do
  if e.set then
    if e.ex then
      redis.call("SET", k, e.v, "EX", e.ex)
    else
      redis.call("SET", k, e.v, "KEEPTTL")
    end
  end
end
return replies
`)

// AllowCall implements edge.CallLimiter: from a lease when this instance
// holds tokens for c, else in one script run. A cluster client cannot run
// one script over keys in different slots, so it goes step by step there.
func (l *Limiter) AllowCall(ctx context.Context, c edge.CallLimits) (edge.CallResult, error) {
	if _, cluster := l.rdb.(*redis.ClusterClient); cluster {
		return edge.AllowCallEach(ctx, l, l, c)
	}
	return l.leased(c)
}

// ask decides one call in Redis (or, ahead, asks for a lease with no call)
// and asks for up to want tokens for c's buckets and quota: grant is how
// many it got (0 when the call is refused), and res is the answer after
// charging all of them. When want is more than one, Redis keeps a record
// of the grant under record, for the refund.
func (l *Limiter) ask(c edge.CallLimits, want int, ahead bool) (res edge.CallResult, grant int, record string, err error) {
	keys := make([]string, 0, len(c.Buckets)+2)
	for _, id := range c.Buckets {
		keys = append(keys, gcraPrefix+id)
	}
	withQuota := 0
	if c.QuotaBucket != "" {
		keys = append(keys, c.QuotaBucket, c.QuotaBucket+leasedSuffix)
		withQuota = 1
	}
	var recordMS int64
	if want > 1 && len(keys) > 0 {
		record = l.recordKey(keys[0])
		keys = append(keys, record)
		recordMS = recordTTL.Milliseconds()
	}
	v, err := l.batched(ahead, keys, c.Burst, c.RPS, 1, withQuota, c.QuotaLimit, int64(c.QuotaTTL.Seconds())+1, want, recordMS)
	if err != nil {
		if record != "" && mayHaveRun(err) {
			// The script may have run and charged a grant whose answer
			// was lost (timed out, or cut off with its connection): give
			// it back once Redis is likely to answer again. Where it did
			// not run there is no record, and nothing goes back.
			l.refundLost(c, want, record)
		}
		return res, 0, "", fmt.Errorf("redis call limits: %w", err)
	}
	res, grant, err = parseCall(v, c)
	if err != nil {
		return res, 0, "", fmt.Errorf("redis call limits: %w", err)
	}
	return res, grant, record, nil
}

var errReply = errors.New("unexpected script reply")

// mayHaveRun tells whether err may have come after Redis ran the command
// and its reply was lost: every error but those that show it was never sent
// (no connection to send it on) and Redis's own error replies (the reply
// came: a refused script, or one whose state is unusable, charged no
// grant, and refunding after each would cost a script run per request).
func mayHaveRun(err error) bool {
	if errors.Is(err, redis.ErrClosed) || errors.Is(err, redis.ErrPoolTimeout) || errors.Is(err, redis.ErrPoolExhausted) ||
		errors.Is(err, edge.ErrLimitState) || errors.Is(err, errNotSent) {
		return false
	}
	var reply redis.Error
	if errors.As(err, &reply) {
		return false
	}
	var op *net.OpError
	return !errors.As(err, &op) || op.Op != "dial"
}

func parseCall(v []any, c edge.CallLimits) (edge.CallResult, int, error) {
	res := edge.CallResult{Rates: make([]edge.RateResult, 0, len(c.Buckets))}
	if len(v) == 0 {
		return res, 0, errReply
	}
	g, ok := v[len(v)-1].(int64)
	if !ok || g < 0 {
		return res, 0, errReply
	}
	grant := int(g)
	v = v[:len(v)-1]
	for len(v) >= 4 && len(res.Rates) < len(c.Buckets) {
		allowed, ok1 := v[0].(int64)
		remaining, ok2 := v[1].(int64)
		retry, ok3 := v[2].(int64)
		reset, ok4 := v[3].(int64)
		if !ok1 || !ok2 || !ok3 || !ok4 {
			return res, 0, errReply
		}
		res.Rates = append(res.Rates, edge.RateResult{
			Allowed:    allowed > 0,
			Limit:      c.Burst,
			Remaining:  int(remaining),
			RetryAfter: micros(retry),
			ResetAfter: micros(reset),
		})
		v = v[4:]
		if allowed == 0 {
			return res, 0, nil
		}
	}
	if c.QuotaBucket == "" {
		return res, grant, nil
	}
	if len(v) != 2 {
		return res, 0, errReply
	}
	allowed, ok1 := v[0].(int64)
	used, ok2 := v[1].(int64)
	if !ok1 || !ok2 {
		return res, 0, errReply
	}
	res.QuotaChecked, res.QuotaUsed, res.QuotaAllowed = true, used, allowed == 1
	res.QuotaLeased = allowed == -1
	if !res.QuotaAllowed {
		grant = 0
	}
	return res, grant, nil
}

// micros converts the script's microseconds (rounded up from redis_rate's
// float seconds, so whole seconds round as Allow's do) to a duration;
// redis_rate's -1 "not applicable" becomes 0, as in Allow.
func micros(us int64) time.Duration { return max(0, time.Duration(us)*time.Microsecond) }
