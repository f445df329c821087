"""The server-side script of the `redis` materialization, and the argument layout it reads.

Kept as a string in a module (not a .lua file) so it ships with the package whatever the build
includes. The script runs atomically in Redis: the fence check, every document of a chunk, its
stream entries and the checkpoint are applied together or not at all. It never fails halfway:
SET overwrites any type, hashes are deleted before HSET, and the stream's type is checked before
the first write (Redis refuses a ``#!lua`` script up front when memory is full).
"""

from __future__ import annotations

import hashlib

APPLY = """\
#!lua
-- localflow `redis` materialization: apply one chunk of documents and its checkpoint atomically.
-- KEYS: checkpoint hash, fence hash. ARGV (built by materialization.py):
--   nparts, then per partition: field ("<topic>:<partition>"), fence token, expected checkpoint
--     ("" = none), checkpoint after this chunk;
--   nclocks, then per source clock: "<topic>:<partition>" (see Record.source);
--   nbind, then per binding: mode ("j" json | "h" hash), ttl ms ("0" = none), stream key ("" = none),
--     stream maxlen;
--   position key prefix;
--   then per document: binding index, clock index, source offset, key, value
--     (json: 1 arg; hash: field count n then 2n args), and the document JSON if the binding streams.
-- Replies: {1, applied, refused} | {3} chunk already applied | {0, field, fence held} not our fence |
--   {2, field, stored checkpoint} checkpoint is not where this worker left it | {4, key, type} bad stream.
local ckpt, fence = KEYS[1], KEYS[2]
local a = 1
local nparts = tonumber(ARGV[a]); a = a + 1
local fields, afters = {}, {}
local fresh, done, fresh_field = 0, 0, ''
for i = 1, nparts do
  local field, token, expected, after = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  fields[i], afters[i] = field, after
  a = a + 4
  local held = redis.call('HGET', fence, field)
  if held ~= token then return {0, field, held or ''} end
  local stored = redis.call('HGET', ckpt, field)
  if (stored or '') == expected then
    fresh, fresh_field = fresh + 1, field
  elseif stored and tonumber(stored) >= tonumber(after) then
    done = done + 1  -- a retry of a chunk whose reply was lost: applied already
  else
    return {2, field, stored or ''}
  end
end
if done > 0 then
  if fresh > 0 then return {2, fresh_field, 'partly applied'} end
  return {3}
end

local nclocks = tonumber(ARGV[a]); a = a + 1
local clocks = {}
for i = 1, nclocks do clocks[i] = ARGV[a]; a = a + 1 end

local nbind = tonumber(ARGV[a]); a = a + 1
local modes, ttls, streams, maxlens = {}, {}, {}, {}
for i = 1, nbind do
  modes[i], ttls[i], streams[i], maxlens[i] = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  a = a + 4
  if streams[i] ~= '' then
    local t = redis.call('TYPE', streams[i])['ok']
    if t ~= 'none' and t ~= 'stream' then return {4, streams[i], t} end
  end
end
local posprefix = ARGV[a]; a = a + 1

-- First pass: where each document's arguments are, and the position every key holds, read in a few
-- MGETs (one redis.call per document is most of a script's time).
local bs, cs, offs, keys, firsts, lasts, sdocs, pkeys = {}, {}, {}, {}, {}, {}, {}, {}
local n, ndocs = #ARGV, 0
while a <= n do
  ndocs = ndocs + 1
  local b, key = tonumber(ARGV[a]), ARGV[a + 3]
  bs[ndocs], cs[ndocs], offs[ndocs], keys[ndocs] = b, tonumber(ARGV[a + 1]), ARGV[a + 2], key
  pkeys[ndocs] = posprefix .. key
  a = a + 4
  local first, last = a, a
  if modes[b] == 'h' then
    first = a + 1
    last = a + 2 * tonumber(ARGV[a])
  end
  firsts[ndocs], lasts[ndocs] = first, last
  a = last + 1
  if streams[b] ~= '' then
    if modes[b] == 'h' then sdocs[ndocs] = ARGV[a]; a = a + 1 else sdocs[ndocs] = ARGV[first] end
  end
end

-- Lua's unpack takes at most ~8000 values: long lists go to Redis in slices.
local SLICE = 1000
local held = {}
for i = 1, ndocs, SLICE do
  local got = redis.call('MGET', unpack(pkeys, i, math.min(i + SLICE - 1, ndocs)))
  for j = 1, #got do held[i + j - 1] = got[j] end
end

-- JSON values and positions without a TTL are written by MSET at the end (or before any write
-- that must come after them), so a chunk costs a few calls, not three per document.
local vals, poss, nv, np = {}, {}, 0, 0
local function mset(list, count)
  for i = 1, count, SLICE do redis.call('MSET', unpack(list, i, math.min(i + SLICE - 1, count))) end
end
local function flush_vals() if nv > 0 then mset(vals, nv); vals, nv = {}, 0 end end
local function flush_poss() if np > 0 then mset(poss, np); poss, np = {}, 0 end end

-- A key remembers the source position "<topic>:<partition>:<offset>" of the document it holds.
-- An older or equal offset of the same clock is a replay, a re-delivery or a stalled worker's
-- late write and must not make the key older; another clock (another topic or partition, or
-- a position of the format before topics were part of it) does not compare: the later write wins.
local latest = {}  -- key -> position written earlier in this chunk
local applied, refused = 0, 0
for d = 1, ndocs do
  local key, clock, off = keys[d], clocks[cs[d]], offs[d]
  local pos = latest[key] or held[d]
  local newer = true
  if pos then
    local hc, ho = string.match(pos, '^(.*):(%d+)$')
    if hc == clock and tonumber(ho) >= tonumber(off) then
      newer = false
    end
  end
  if newer then
    local b = bs[d]
    local mode, ttl, stream = modes[b], ttls[b], streams[b]
    local first, last = firsts[d], lasts[d]
    local newpos = clock .. ':' .. off
    latest[key] = newpos
    if mode == 'h' then
      flush_vals()
      redis.call('DEL', key)
      for i = first, last, 200 do
        redis.call('HSET', key, unpack(ARGV, i, math.min(i + 199, last)))
      end
      if ttl ~= '0' then redis.call('PEXPIRE', key, ttl) end
    elseif ttl ~= '0' then
      flush_vals()
      redis.call('SET', key, ARGV[first], 'PX', ttl)
    else
      vals[nv + 1], vals[nv + 2], nv = key, ARGV[first], nv + 2
    end
    if ttl ~= '0' then
      flush_poss()
      redis.call('SET', pkeys[d], newpos, 'PX', ttl)
    else
      poss[np + 1], poss[np + 2], np = pkeys[d], newpos, np + 2
    end
    if stream ~= '' then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlens[b], '*', 'key', key, 'doc', sdocs[d])
    end
    applied = applied + 1
  else
    refused = refused + 1
  end
end
flush_vals()
flush_poss()

for i = 1, nparts do
  redis.call('HSET', ckpt, fields[i], afters[i])
end
return {1, applied, refused}
"""

APPLY_SHA = hashlib.sha1(APPLY.encode()).hexdigest()  # noqa: S324 - the script id Redis uses

# Reply codes of APPLY (first element of its reply).
FENCE = 0
APPLIED = 1
CHECKPOINT_MOVED = 2
ALREADY_APPLIED = 3
BAD_STREAM = 4

REWIND = """\
#!lua
-- localflow `redis` materialization: set one partition's checkpoint back past an offset gap, under
-- this worker's fence. KEYS: checkpoint hash, fence hash. ARGV: field, fence token, next offset.
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
