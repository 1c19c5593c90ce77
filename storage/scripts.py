"""Lua scripts: each runs atomically and touches only one session's keys (one cluster slot).

No script decodes or re-encodes a record: they move the text Python wrote, so nothing is reformatted
(Redis' cjson would round floats and turn empty lists into objects).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError


class Lua:
    """A script run with EVALSHA (falling back to EVAL once), or queued as EVAL in a pipeline."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.eval(self.source, len(keys), *keys, *args)


#: KEYS meta. ARGV created, then field/value pairs. Idempotent: a retry of the same create is 'same'.
CREATE = Lua("""
local c = redis.call('HGET', KEYS[1], 'created')
if c then
  if c == ARGV[1] then return 'same' end
  return 'exists'
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 'ok'
""")

#: KEYS meta msgs live. ARGV schema, updated, n, then per message: id, mode (tip|root|id), parent,
#: record-without-parent-and-seq, live value ('' when not streaming). A user message never attaches
#: to a stored user message (another writer's turn still waiting for its reply, or one whose reply
#: failed): it goes to that message's parent instead, a sibling branch, so a turn is never split.
#: Messages added by the same batch chain as given. Returns per message
#: ('new', parent id or '', seq) or ('dup', stored record, -1). Validates before writing anything,
#: so a refused batch leaves nothing behind.
APPEND = Lua("""
local meta, msgs, live = KEYS[1], KEYS[2], KEYS[3]
local v = redis.call('HGET', meta, 'v')
if not v then return {'nosession'} end
if v ~= ARGV[1] then return {'version', v} end
local n = tonumber(ARGV[3])
local seen = {}
for i = 0, n - 1 do
  local b = 4 + i * 5
  local mode, parent = ARGV[b + 1], ARGV[b + 2]
  if mode == 'id' and not seen[parent] and redis.call('HEXISTS', msgs, parent) == 0 then
    return {'noparent', parent}
  end
  seen[ARGV[b]] = true
end
local tip = redis.call('HGET', meta, 'tip')
local chain = ''
if tip and tip ~= 'null' then chain = string.sub(tip, 2, -2) end
local newtip = nil
local fresh = {}
local added = 0
local out = {}
for i = 0, n - 1 do
  local b = 4 + i * 5
  local id, mode, parent, rest, lv = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local old = redis.call('HGET', msgs, id)
  if old then
    out[#out + 1] = 'dup'
    out[#out + 1] = old
    out[#out + 1] = -1
  else
    local pj = ''
    if mode == 'tip' then pj = chain elseif mode == 'id' then pj = parent end
    if pj ~= '' and not fresh[pj] and string.match(rest, '^[^\\t]*\\t[^\\t]*\\t([^\\t]*)') == 'user' then
      local prec = redis.call('HGET', msgs, pj)
      local pp, prole = string.match(prec or '', '^([^\\t]*)\\t[^\\t]*\\t[^\\t]*\\t[^\\t]*\\t([^\\t]*)')
      if prole == 'user' then pj = pp end
    end
    local seq = redis.call('HINCRBY', meta, 'seq', 1) - 1
    redis.call('HSET', msgs, id, pj .. '\\t' .. seq .. '\\t' .. rest)
    if lv ~= '' then redis.call('HSET', live, id, lv) end
    newtip = id
    fresh[id] = true
    added = added + 1
    out[#out + 1] = 'new'
    out[#out + 1] = pj
    out[#out + 1] = seq
  end
  chain = id
end
if added > 0 then
  redis.call('HSET', meta, 'tip', '"' .. newtip .. '"')
  redis.call('HINCRBY', meta, 'count', added)
  local cur = tonumber(redis.call('HGET', meta, 'updated'))
  if not cur or tonumber(ARGV[2]) > cur then redis.call('HSET', meta, 'updated', ARGV[2]) end
end
return out
""")

#: KEYS msgs live. ARGV id, record, live value. 0 when the reply is no longer live (finished/deleted).
CHECKPOINT = Lua("""
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
""")

#: KEYS meta msgs live. ARGV id, final record, updated. {1} or {0, stored record or nil}.
FINISH = Lua("""
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  return {0, redis.call('HGET', KEYS[2], ARGV[1])}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[1], 'updated'))
if cur and tonumber(ARGV[3]) > cur then redis.call('HSET', KEYS[1], 'updated', ARGV[3]) end
return {1}
""")

#: KEYS live. ARGV id, live value.
HEARTBEAT = Lua("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
""")

#: KEYS meta msgs. ARGV id, schema.
SET_TIP = Lua("""
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 'nosession' end
if v ~= ARGV[2] then return 'version:' .. v end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 'nomessage' end
redis.call('HSET', KEYS[1], 'tip', '"' .. ARGV[1] .. '"')
return 'ok'
""")

#: KEYS msgs. ARGV triples: id, sha1 of the header line we read, new header line. Replaces a record's
#: header (keeping its text) only if it is unchanged since we read it; returns how many were replaced.
SET_HEADERS = Lua("""
local n = 0
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local nl = string.find(cur, '\\n', 1, true)
    if nl and redis.sha1hex(string.sub(cur, 1, nl - 1)) == ARGV[i + 1] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2] .. string.sub(cur, nl))
      n = n + 1
    end
  end
end
return n
""")

# Reading: a session record's values are JSON texts, so it can come back as one JSON document built by
# concatenation: one bulk reply per session parses far faster than 26 (redis-py parses in Python).
_OBJ = """
local function obj(h)
  local parts = {}
  for i = 1, #h, 2 do parts[#parts + 1] = '"' .. h[i] .. '":' .. h[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end
"""

#: KEYS meta. The session record as one JSON object, or false when there is none.
META = Lua(_OBJ + """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
return obj(h)
""")
