-- proxyd's shared admission (proxyd/redis_admission.py): every operation is this one script, so each runs
-- atomically on Redis and reads Redis's own clock (TIME). ARGV[1] names the operation, ARGV[2] is the key
-- prefix. Keys are computed here from the prefix (one Redis, not a cluster: docs/DESIGN.md).
--
-- Keys (W = "<len(user)>:<user>:<scope>", scope "*" or a model; length-prefixed so no two collide):
--   ready           hash: epoch, at (us: admissions wait until then after a rebuild), run_id, layout
--   b:<period>:W    r0 r1 r2 h0 h1 h2 (six packed doubles): used requests/tokens/nano-USD, then held
--                   (reserved) ones; period d<day>, m<month>, total
--   mz:W / mw:W     the sliding minute: zset request -> admitted (us), hash request -> requests tokens
--                   (packed doubles), and field # -> requests tokens expiry-set-at (us), the window's sums
-- Requests in flight are the total bucket's h0 (held requests): every hold is in it until it ends.
--   h:<rid>         a hold: u m d mo tok cost s (p pending, s settled, v voided, l lapsed) e (epoch) i (instance) t (us)
--   inst            zset instance -> lease expiry (us);  ih:<instance>: set of its pending holds
-- Lua numbers are doubles: amounts are exact below 2^53 (9e15 tokens, 9e6 USD in nano-USD); costs are
-- computed with prices split into whole nano-USD per token and a remainder, so no product exceeds that.
--
-- Why counters are packed doubles and the answers arrays of integers: turning numbers into text and back
-- was the costliest thing this script did (Redis writes a number argument with printf's %.17g, Lua
-- concatenates one with %.14g, tonumber is strtod: glibc's multi-precision paths), more than its
-- commands. struct.pack/unpack do neither, a bucket is one value (one GET, one SET), and an integer in
-- an answer array is not formatted at all; what must be text (a score, a time) is formatted with %d, the
-- integer path. Counted in redis-server's instructions: python -m load.redis_admission_instructions.

local op, P = ARGV[1], ARGV[2]
local ENDED_TTL = 120        -- seconds an ended hold is remembered: a retried settle/void within it applies once
local LAPSED_TTL = 86400     -- a lapsed hold (its instance stopped renewing) still takes its settle this long
local MINUTE = 60000000      -- us
local fmt = string.format

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(t[1])
end

local function fl(x) return math.floor(x) end

local function days_from_civil(y, m, d)  -- H. Hinnant's algorithm (proleptic Gregorian, UTC)
  if m <= 2 then y = y - 1 end
  local era = fl(y / 400)
  local yoe = y - era * 400
  local doy = fl((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + fl(yoe / 4) - fl(yoe / 100) + doy - 719468
end

local function calendar(sec)  -- day key, month key, day end, month end (as proxyd/periods.py)
  local days = fl(sec / 86400)
  local z = days + 719468
  local era = fl(z / 146097)
  local doe = z - era * 146097
  local yoe = fl((doe - fl(doe / 1460) + fl(doe / 36524) - fl(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fl(yoe / 4) - fl(yoe / 100))
  local mp = fl((5 * doy + 2) / 153)
  local d = doy - fl((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d-%02d', y, m, d), string.format('%04d-%02d', y, m),
         (days + 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

local WHO = {}  -- user -> '<len>:<user>:' (a number concatenated is formatted with %.14g: once per call)
local function who(user, scope)
  local u = WHO[user]
  if not u then u = fmt('%d:%s:', #user, user) WHO[user] = u end
  return u .. scope
end
local function num(v) return tonumber(v) or 0 end
local WINDOWS = {[0] = 'minute', [1] = 'concurrent', [2] = 'day', [3] = 'month', [4] = 'total'}
local function periods(d, mo) return {'d' .. d, 'm' .. mo, 'total'} end
-- Counters are stored as packed doubles (struct, bundled with Redis's Lua): read and written without
-- turning numbers into text or back (exact: every amount is an integer below 2^53).
local pack, unpack2 = struct.pack, struct.unpack
local function pair(v)  -- a minute entry: requests, tokens
  local a, b = unpack2('<dd', v)
  return a, b
end
local function sums(v)  -- a minute's "#": requests, tokens, when its keys' expiry was last set (0: unknown)
  if not v then return 0, 0, 0 end
  local a, b, c = unpack2('<ddd', v)
  return a, b, c
end

-- The counters are read once per call and written back whole, not bumped field by field: every
-- command costs Redis time, and the script is atomic, so a read-modify-write is as safe as INCRBY.
-- B and M cache what this call has read, kept up to date by its own writes (and dropped on DEL).
local B, M = {}, {}

-- A day's or month's bucket expires two days after its period ends; the total never does. Set when the
-- bucket is created (here or by the rebuild), from the period in its name, whichever path creates it.
local function bucket_expiry(period)
  local c = string.sub(period, 1, 1)
  if c == 'd' then
    local y, m, d = string.match(period, '^d(%d+)-(%d+)-(%d+)$')
    return (days_from_civil(tonumber(y), tonumber(m), tonumber(d)) + 1) * 86400 + 172800
  elseif c == 'm' then
    local y, m = string.match(period, '^m(%d+)-(%d+)$')
    y, m = tonumber(y), tonumber(m) + 1
    if m == 13 then y, m = y + 1, 1 end
    return days_from_civil(y, m, 1) * 86400 + 172800
  end
  return nil
end

-- b:<period>:W as {r0, r1, r2, h0, h1, h2} (used and held requests, tokens, nano-USD), read once per call
-- (B[W][period]: no key string is built for a bucket already read).
local function bucket(period, w)
  local bw = B[w]
  if not bw then bw = {} B[w] = bw end
  local b = bw[period]
  if not b then
    local k = P .. 'b:' .. period .. ':' .. w
    local v = redis.call('GET', k)
    if v then
      local a, c, d, e, f, g = unpack2('<dddddd', v)
      b = {a, c, d, e, f, g, k = k, period = period}
    else
      b = {0, 0, 0, 0, 0, 0, fresh = true, k = k, period = period}
    end
    bw[period] = b
  end
  return b
end

local function bucket_add(b, dr, dt, dc, dh, dht, dhc)  -- used (r) and held (h) deltas
  b[1], b[2], b[3], b[4], b[5], b[6] = b[1] + dr, b[2] + dt, b[3] + dc, b[4] + dh, b[5] + dht, b[6] + dhc
  local v = pack('<dddddd', b[1], b[2], b[3], b[4], b[5], b[6])
  local e = b.fresh and bucket_expiry(b.period)
  b.fresh = false
  if e then redis.call('SET', b.k, v, 'EXAT', fmt('%d', e)) else redis.call('SET', b.k, v, 'KEEPTTL') end
end

-- The sliding minute of W, expired to `now`: returns its requests and tokens (once per call and W).
local function minute(w, now)
  local m = M[w]
  if m then return m[1], m[2] end
  local zk, hk = P .. 'mz:' .. w, P .. 'mw:' .. w
  local dr, dt = 0, 0
  local horizon = fmt('%d', now - MINUTE)
  local old = redis.call('ZRANGEBYSCORE', zk, '-inf', horizon, 'LIMIT', '0', '1000')
  while #old > 0 do
    local vals = redis.call('HMGET', hk, unpack(old))
    for i = 1, #old do
      if vals[i] then
        local r, t = pair(vals[i])
        dr, dt = dr + r, dt + t
      end
    end
    redis.call('HDEL', hk, unpack(old))
    redis.call('ZREM', zk, unpack(old))
    old = redis.call('ZRANGEBYSCORE', zk, '-inf', horizon, 'LIMIT', '0', '1000')
  end
  local r, t, e = sums(redis.call('HGET', hk, '#'))
  m = {r - dr, t - dt, e}
  if dr ~= 0 or dt ~= 0 then redis.call('HSET', hk, '#', pack('<ddd', m[1], m[2], e)) end
  M[w] = m
  return m[1], m[2]
end

-- Enters a request into W's minute (read first: the sums are written with the entry, in one HSET).
local function minute_add(w, rid, at, requests, tokens, now)
  local r, t = minute(w, now)
  local zk, hk = P .. 'mz:' .. w, P .. 'mw:' .. w
  local e = M[w][3]
  r, t = r + requests, t + tokens
  -- The keys live 120 s from when their expiry was last set, which is renewed once it is 30 s old (not
  -- at every entry: two commands saved per scope): an entry always outlives its 60 s in the window.
  local renew = now - e > 30000000
  if renew then e = now end
  M[w] = {r, t, e}
  redis.call('ZADD', zk, fmt('%d', at), rid)
  redis.call('HSET', hk, rid, pack('<dd', requests, tokens), '#', pack('<ddd', r, t, e))
  if renew then
    redis.call('PEXPIRE', zk, '120000')
    redis.call('PEXPIRE', hk, '120000')
  end
end

-- Corrects a still-live entry (settle: actual tokens; void: nothing); an expired one is left alone.
local function minute_adjust(w, rid, requests, tokens)
  local hk = P .. 'mw:' .. w
  local v = redis.call('HMGET', hk, rid, '#')
  if not v[1] then return end
  local r, t = pair(v[1])
  local sr, st, e = sums(v[2])
  sr, st = sr + requests - r, st + tokens - t
  redis.call('HSET', hk, rid, pack('<dd', requests, tokens), '#', pack('<ddd', sr, st, e))
  if M[w] then M[w] = {sr, st, e} end
end

-- Earliest time (us) at which `need` units of the metric will have left the window.
local function free_at(w, metric, need, now)
  local ents = redis.call('ZRANGE', P .. 'mz:' .. w, 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #ents, 2 do
    local v = redis.call('HGET', P .. 'mw:' .. w, ents[i])
    if v then
      local r, t = pair(v)
      freed = freed + (metric == 0 and r or t)
      if freed >= need then return tonumber(ents[i + 1]) + MINUTE end
    end
  end
  return now + MINUTE
end

-- Holds (sign 1) or releases (sign -1) a request's reservation in every bucket of both scopes, and in
-- their concurrency counters; `used` (settle) posts its actual usage in the same writes.
local function hold_amounts(user, model, d, mo, sign, tok, cost, used, utok, ucost)
  if sign < 0 then tok, cost = 0 - tok, 0 - cost end  -- not sign * x: -1 * 0 is -0, written "-0"
  local ur = used and 1 or 0
  utok, ucost = utok or 0, ucost or 0
  for _, scope in ipairs({'*', model}) do
    local w = who(user, scope)
    for _, period in ipairs(periods(d, mo)) do
      bucket_add(bucket(period, w), ur, utok, ucost, sign, tok, cost)
    end
  end
end

local function post_used(user, model, d, mo, tok, cost)
  for _, scope in ipairs({'*', model}) do
    local w = who(user, scope)
    for _, period in ipairs(periods(d, mo)) do
      bucket_add(bucket(period, w), 1, tok, cost, 0, 0, 0)
    end
  end
end

-- Drops a model scope's state when nothing is used or reserved in it (every request to it was voided,
-- e.g. a model name Ollama does not have): model names come from clients (as Limiter._forget_if_unused).
local function forget_if_unused(user, model, d, mo)
  local w = who(user, model)
  local keys = {}
  for _, period in ipairs(periods(d, mo)) do
    local b = bucket(period, w)
    for i = 1, 6 do if b[i] ~= 0 then return end end
    keys[#keys + 1] = b.k
  end
  local r, t = sums(redis.call('HGET', P .. 'mw:' .. w, '#'))
  if r ~= 0 or t ~= 0 then return end
  B[w], M[w] = nil, nil
  keys[#keys + 1] = P .. 'mz:' .. w
  keys[#keys + 1] = P .. 'mw:' .. w
  redis.call('DEL', unpack(keys))
end

local HOLD_FIELDS = {'u', 'm', 'd', 'mo', 'tok', 'cost', 's', 'e', 'i'}
local function read_hold(rid)
  local v = redis.call('HMGET', P .. 'h:' .. rid, unpack(HOLD_FIELDS))
  if not v[1] then return nil end
  local h = {}
  for i, f in ipairs(HOLD_FIELDS) do h[f] = v[i] end
  h.tok, h.cost = tonumber(h.tok), tonumber(h.cost)
  return h
end

-- A pending hold released as a void is: the attempt stays in the all-models minute, its tokens leave.
local function release_void(rid, h)
  hold_amounts(h.u, h.m, h.d, h.mo, -1, h.tok, h.cost)
  minute_adjust(who(h.u, '*'), rid, 1, 0)
  minute_adjust(who(h.u, h.m), rid, 0, 0)
  forget_if_unused(h.u, h.m, h.d, h.mo)
end

local function end_hold(rid, h, state, ttl)
  redis.call('HSET', P .. 'h:' .. rid, 's', state)
  redis.call('EXPIRE', P .. 'h:' .. rid, ttl)
  if h.i then redis.call('SREM', P .. 'ih:' .. h.i, rid) end
end

-- The keys' layout (what is stored where, and how); the rebuild writes it into the marker. A marker of
-- another layout (counters written by an older proxyd) is dropped: the counters are rebuilt from the
-- ledger in this one, as after an empty restart.
local LAYOUT = '2'
local function ready_state()
  local r = redis.call('HMGET', P .. 'ready', 'epoch', 'at', 'layout')
  if r[1] and r[3] ~= LAYOUT then
    redis.call('DEL', P .. 'ready')
    return nil, 0
  end
  return r[1], num(r[2])
end

-- Exact comparison p*in + c*out <= room * 1e6 (prices split: in = ih*1e6 + il, out = oh*1e6 + ol).
local ih, il, oh, ol
local function cost_fits(room, p, c)
  local lo = p * il + c * ol
  local hi = p * ih + c * oh + fl(lo / 1000000)
  lo = lo % 1000000
  return hi < room or (hi == room and lo == 0)
end

-- -------------------------------------------------------------------------------------------------------
if op == 'reserve' or op == 'status' then
  -- ARGV: 3 rid, 4 instance, 5 lease us, 6 user, 7 model, 8 prompt, 9 completion, 10 default?, 11 min
  -- completion, 12 13 input price (whole nano-USD per token, remainder), 14 15 output price, 16 the limits,
  -- packed (struct '<BBBd' each: scope 0 all models, 1 the model; metric 0 requests, 1 tokens, 2 cost;
  -- window, a WINDOWS index; the limit). One unpack, not a pattern match and tonumber per field.
  -- The answer is one array: integers (not formatted here, not parsed there) and the period and epoch names.
  local epoch, at = ready_state()
  if not epoch then return {-1} end
  local us, sec = now_us()
  if op == 'reserve' and at > us then return {-2, at - us} end
  local rid, inst, lease, user, model = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local p, c, isdef, minc = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1', tonumber(ARGV[11])
  ih, il, oh, ol = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
  local dkey, mkey, dend, mend = calendar(sec)
  local checks, out, last = {}, {}, {}
  local W = {[0] = who(user, '*'), [1] = who(user, model)}
  local PERIOD = {day = 'd' .. dkey, month = 'm' .. mkey, total = 'total'}
  local RESET = {day = dend * 1000000, month = mend * 1000000, total = -1}
  local n = 0
  local nlim = #ARGV[16] / 11
  local L = nlim > 0 and {unpack2('<' .. string.rep('BBBd', nlim), ARGV[16])} or {}
  for j = 1, 4 * nlim, 4 do
    local metric, window, limit = L[j + 1], WINDOWS[L[j + 2]], L[j + 3]
    local w = W[L[j]]
    local used, reserved, reset = 0, 0, -1
    if window == 'minute' then
      local r, t = minute(w, us)
      used = metric == 0 and r or t
      reset = last[w]
      if not reset then  -- when the window's newest entry leaves it (x-ratelimit reset)
        local e = redis.call('ZRANGE', P .. 'mz:' .. w, -1, -1, 'WITHSCORES')
        reset = e[2] and (tonumber(e[2]) + MINUTE) or us
        last[w] = reset
      end
    elseif window == 'concurrent' then
      used = bucket('total', w)[4]  -- held requests: those in flight
    else
      local b = bucket(PERIOD[window], w)
      used, reserved, reset = b[metric + 1], b[metric + 4], RESET[window]
    end
    checks[#checks + 1] = {metric = metric, window = window, limit = limit, used = used, reserved = reserved, w = w}
    out[n + 1], out[n + 2], out[n + 3] = used, reserved, reset
    n = n + 3
  end
  local head = {us, dkey, mkey, dend, mend, epoch}
  if op == 'status' then
    local r = {1}
    for i = 1, #head do r[#r + 1] = head[i] end
    for i = 1, #out do r[#r + 1] = out[i] end
    return r
  end

  -- 1. How many completion tokens fit every token and cost limit? (as Limiter.try_reserve)
  local fit, binding = c, nil
  for i, k in ipairs(checks) do
    if k.metric ~= 0 then
      local room = k.limit - k.used - k.reserved
      local can
      if k.metric == 1 then
        can = room - p
      elseif oh == 0 and ol == 0 then
        can = cost_fits(room, p, 0) and c or -1
      elseif cost_fits(room, p, c) then
        -- All that was asked fits: nothing to search. (Searching anyway cost ~100 us per reserve with large
        -- cost limits: room * 1e6 is past 2^53 there, so the estimate below is off and the loops run long.)
        can = c
      else
        local outp = oh * 1000000 + ol
        can = fl((room * 1000000 - p * (ih * 1000000 + il)) / outp)
        local n = 0
        while n < 64 and not cost_fits(room, p, can) do can, n = can - 1, n + 1 end
        while n < 128 and cost_fits(room, p, can + 1) do can, n = can + 1, n + 1 end
      end
      if can < fit then fit, binding = can, i end
    end
  end
  local refused, need, budget = nil, 0, false
  if binding then
    if isdef and fit >= minc then
      c = fit
    else
      local least = isdef and minc or c
      local function need_of(metric)
        if metric == 1 then return p + least end
        local lo = p * il + least * ol
        local hi = p * ih + least * oh + fl(lo / 1000000)
        return (lo % 1000000 == 0) and hi or hi + 1
      end
      refused = binding
      local worst = 1.0
      for i, k in ipairs(checks) do
        if k.metric ~= 0 then
          local over = k.limit > 0 and need_of(k.metric) / k.limit or math.huge
          if over > worst then refused, worst = i, over end
        end
      end
      need = need_of(checks[refused].metric)
      budget = isdef  -- the refusal says the budget was proxyd's default (only a token or cost refusal)
    end
  end
  -- 2. Requests and concurrency.
  if not refused then
    for i, k in ipairs(checks) do
      if k.metric == 0 and k.used + k.reserved + 1 > k.limit then refused, need = i, 1 break end
    end
  end
  if refused then
    local k = checks[refused]
    local free = -1
    if k.window == 'minute' then free = free_at(k.w, k.metric, need - (k.limit - k.used), us) end
    local r = {0, refused, need, free, budget and 1 or 0}
    for i = 1, #head do r[#r + 1] = head[i] end
    for i = 1, #out do r[#r + 1] = out[i] end
    return r
  end

  -- 3. Reserve against every window of both scopes (also those without a limit: a limit set later sees
  --    what is already in flight), and record the hold under this instance's lease.
  local tok = p + c
  local lo = p * il + c * ol + 500000
  local cost = p * ih + c * oh + fl(lo / 1000000)
  hold_amounts(user, model, dkey, mkey, 1, tok, cost)
  minute_add(who(user, '*'), rid, us, 1, tok, us)
  minute_add(who(user, model), rid, us, 1, tok, us)
  redis.call('HSET', P .. 'h:' .. rid, 'u', user, 'm', model, 'd', dkey, 'mo', mkey, 'tok', fmt('%d', tok), 'cost',
             fmt('%d', cost), 's', 'p', 'e', epoch, 'i', inst)
  redis.call('SADD', P .. 'ih:' .. inst, rid)
  redis.call('ZADD', P .. 'inst', 'NX', fmt('%d', us + lease), inst)
  local r = {1, c, cost}
  for i = 1, #head do r[#r + 1] = head[i] end
  for i = 1, #out do r[#r + 1] = out[i] end
  return r

-- -------------------------------------------------------------------------------------------------------
elseif op == 'settle' or op == 'void' then
  -- ARGV: 3 rid, 4 epoch of the hold, 5 apply-if-orphaned (1/0); settle: 6 tokens, 7 nano-USD, 8 user,
  -- 9 model, 10 day, 11 month (to post an orphan: a hold reserved before the counters were rebuilt).
  -- Returns 1 applied, 0 already ended (or unknown), 2 orphan posted, 3 posted after its lease lapsed, -1 not ready.
  local epoch = ready_state()
  if not epoch then return -1 end
  local rid = ARGV[3]
  local h = read_hold(rid)
  if not h then
    if op == 'settle' and ARGV[5] == '1' and ARGV[4] ~= epoch then
      local tok = tonumber(ARGV[6])
      post_used(ARGV[8], ARGV[9], ARGV[10], ARGV[11], tok, tonumber(ARGV[7]))
      return 2
    end
    return 0
  end
  if h.s == 's' or h.s == 'v' then return 0 end
  if op == 'void' then
    if h.s == 'p' then release_void(rid, h) end
    end_hold(rid, h, 'v', ENDED_TTL)
    return 1
  end
  local tok, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
  local lapsed = h.s == 'l'
  if lapsed then  -- its hold was released when the lease lapsed: only the usage is posted
    post_used(h.u, h.m, h.d, h.mo, tok, cost)
  else
    hold_amounts(h.u, h.m, h.d, h.mo, -1, h.tok, h.cost, true, tok, cost)
  end
  minute_adjust(who(h.u, '*'), rid, 1, tok)
  minute_adjust(who(h.u, h.m), rid, 1, tok)
  end_hold(rid, h, 's', ENDED_TTL)
  return lapsed and 3 or 1

-- -------------------------------------------------------------------------------------------------------
elseif op == 'renew' then
  -- ARGV: 3 instance, 4 lease us. Extends this instance's lease (one call per interval for all its holds)
  -- and lapses the holds of instances whose lease ran out. Returns {epoch or '', 1 if this instance had
  -- to be registered anew (its holds may have lapsed: re-adopt them), holds lapsed, instances reaped}.
  local epoch = ready_state()
  if not epoch then return {'', 0, 0, 0} end
  local inst, lease = ARGV[3], tonumber(ARGV[4])
  local us = now_us()
  local fresh = redis.call('ZADD', P .. 'inst', us + lease, inst)  -- 1: was not there
  local lapsed, reaped = 0, 0
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', P .. 'inst', '-inf', us, 'LIMIT', 0, 16)) do
    reaped = reaped + 1
    for _, rid in ipairs(redis.call('SMEMBERS', P .. 'ih:' .. dead)) do
      local h = read_hold(rid)
      if h and h.s == 'p' then
        release_void(rid, h)
        end_hold(rid, h, 'l', LAPSED_TTL)
        lapsed = lapsed + 1
      end
    end
    redis.call('DEL', P .. 'ih:' .. dead)
    redis.call('ZREM', P .. 'inst', dead)
  end
  return {epoch, fresh, lapsed, reaped}

-- -------------------------------------------------------------------------------------------------------
elseif op == 'leave' then
  -- ARGV: 3 instance. A clean stop: the instance is no longer renewed, and not taken for dead either.
  redis.call('ZREM', P .. 'inst', ARGV[3])
  return 0

-- -------------------------------------------------------------------------------------------------------
elseif op == 'adopt' then
  -- ARGV: 3 instance, 4 lease us, 5 epoch, then per hold: rid, user, model, day, month, tokens, nano-USD,
  -- admitted (us). Re-enters this instance's running holds after a rebuild, or after its lease lapsed
  -- (a stall): without it their reservations would be missing until they settle.
  local inst, lease, epoch = ARGV[3], tonumber(ARGV[4]), ARGV[5]
  local us = now_us()
  local n = 0
  for i = 6, #ARGV, 8 do
    local rid, user, model, d, mo = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local tok, cost, t = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
    local s = redis.call('HGET', P .. 'h:' .. rid, 's')
    if not s or s == 'l' then
      hold_amounts(user, model, d, mo, 1, tok, cost)
      if not s and t > us - MINUTE then
        minute_add(who(user, '*'), rid, t, 1, tok, us)
        minute_add(who(user, model), rid, t, 1, tok, us)
      elseif s == 'l' then
        minute_adjust(who(user, '*'), rid, 1, tok)
        minute_adjust(who(user, model), rid, 1, tok)
      end
      redis.call('HSET', P .. 'h:' .. rid, 'u', user, 'm', model, 'd', d, 'mo', mo, 'tok', ARGV[i + 5], 'cost', ARGV[i + 6],
                 's', 'p', 'e', epoch, 'i', inst)
      redis.call('PERSIST', P .. 'h:' .. rid)
      redis.call('SADD', P .. 'ih:' .. inst, rid)
      n = n + 1
    end
  end
  redis.call('ZADD', P .. 'inst', us + lease, inst)
  return n
end
return redis.error_reply('unknown operation ' .. tostring(op))
