-- Strongroom's trusted Lua core (Lua 5.3), loaded into every fresh runtime.
--
-- The chunk is called once with the worker's one Python callable, `py`, and
-- returns the entry function the worker calls for one invocation. `py` lives
-- only as an upvalue of the closures below: it is never returned, stored in a
-- table or passed to plugin code, and whatever it raises is turned into a
-- plain string before plugin code can see it. Everything that crosses the
-- Python boundary is a Lua string, number, boolean or nil.
--
-- Plugin code runs in its own coroutine with an instruction-count hook; the
-- main thread (this file's entry) never runs plugin code, so a blown budget
-- cannot follow us out. Only the locals captured here are used, so a plugin
-- that rewrites `string` or `table` changes nothing this file relies on.

local py = ...

local type, next, select, tostring, tonumber = type, next, select, tostring, tonumber
local rawget, rawset, rawlen, rawequal = rawget, rawset, rawlen, rawequal
local setmetatable, getmetatable = setmetatable, getmetatable
local error, pcall, xpcall, assert, ipairs, pairs = error, pcall, xpcall, assert, ipairs, pairs
local load = load
local string, table, math, utf8, os, coroutine, debug = string, table, math, utf8, os, coroutine, debug
local s_byte, s_char, s_sub, s_find, s_format = string.byte, string.char, string.sub, string.find, string.format
local s_pack, s_unpack, s_rep, s_gsub, s_match = string.pack, string.unpack, string.rep, string.gsub, string.match
-- Never call a string method with `s:name()` in this file: that looks the name up
-- in the `string` table, which is the plugin's `string` too (it can replace any
-- entry), and the main thread below runs without the instruction hook.
local s_gmatch, s_upper = string.gmatch, string.upper
local t_concat, t_pack, t_unpack = table.concat, table.pack, table.unpack
local t_insert, t_remove, t_move, t_sort = table.insert, table.remove, table.move, table.sort
local m_type, m_floor, m_huge, m_toint = math.type, math.floor, math.huge, math.tointeger
local utf8_len = utf8.len
local co_create, co_resume, co_status, co_wrap = coroutine.create, coroutine.resume, coroutine.status, coroutine.wrap
local sethook, traceback = debug.sethook, debug.traceback
local collectgarbage = collectgarbage

local HOOK_EVERY = 1000
local MAX_DEPTH = 100
local MEM_MSG = "not enough memory"

-- Per-invocation state (this runtime serves exactly one invocation).
local budget, count, exceeded, mem_exceeded, mem_peak = m_huge, 0, false, false, 0
local out, out_n, out_len, out_cap, out_cut = {}, 0, 0, 65536, false
local ctx = {}

local function is_mem_error(e)
  return type(e) == "string" and s_find(e, MEM_MSG, 1, true) ~= nil
end

local function hook()
  count = count + HOOK_EVERY
  local kb = collectgarbage("count")
  if kb > mem_peak then mem_peak = kb end
  if count > budget then
    exceeded = true
    error("instruction budget exceeded (time_limit)", 0)
  end
end

-- Work done by a single C call that the count hook cannot see (it fires only
-- between VM instructions): charged to the budget up front, one instruction per
-- element, so an unbounded C loop is refused instead of running to the wall clock.
local function charge(n)
  count = count + n
  if count > budget then
    exceeded = true
    error("instruction budget exceeded (time_limit)", 0)
  end
end

-- A call into Python. Any failure comes back as a string: never an object.
local function pycall(op, a, b, c)
  local ok, v, err = pcall(py, op, a, b, c)
  if not ok then
    if is_mem_error(v) then error(MEM_MSG, 0) end
    return nil, "internal error in " .. op
  end
  return v, err
end

local function pycall_or_raise(level, op, a, b, c)
  local v, err = pycall(op, a, b, c)
  if v == nil then error(err, level + 1) end
  return v
end

------------------------------------------------------------------------------
-- Private registries: what is a Blob, an Error, a Time, an Sobject.
local BYTES = setmetatable({}, { __mode = "k" })
local ERRORS = setmetatable({}, { __mode = "k" })
local TIMES = setmetatable({}, { __mode = "k" })
local SOBJECTS = setmetatable({}, { __mode = "k" })
local PRINCIPALS = setmetatable({}, { __mode = "k" })

local null = setmetatable({}, {
  __metatable = "null",
  __tostring = function() return "null" end,
  __newindex = function() error("null is read-only", 2) end,
})

------------------------------------------------------------------------------
-- Blob
local Blob = {}
local blob_methods = {}
-- blob[1] is the Blob's bytes as a string (DSM's published kvp plugin reads a
-- value that way); any other key is a method name.
-- getmetatable(b) is Blob itself, as in DSM: published plugins check a Blob
-- with `getmetatable(key) == Blob` (the AWS ones, before signing a request).
local Blob_mt = { __metatable = Blob, __index = function(b, k)
  if k == 1 then return BYTES[b] end
  return blob_methods[k]
end }

local function new_blob(s)
  local b = setmetatable({}, Blob_mt)
  BYTES[b] = s
  return b
end

local function bytes_of(v, what, level)
  local s = BYTES[v]
  if s ~= nil then return s end
  if type(v) == "string" then return v end
  error(s_format("%s: expected a Blob or a string, got %s", what, type(v)), level + 1)
end

local function self_bytes(b, name)
  local s = BYTES[b]
  if s == nil then error("Blob:" .. name .. ": not a Blob", 3) end
  return s
end

function Blob.from_bytes(s)
  if type(s) ~= "string" then error("Blob.from_bytes: expected a string", 2) end
  return new_blob(s)
end
function Blob.from_hex(s)
  if type(s) ~= "string" then error("Blob.from_hex: expected a string", 2) end
  return new_blob(pycall_or_raise(2, "hexd", s))
end
function Blob.from_base64(s)
  if type(s) ~= "string" then error("Blob.from_base64: expected a string", 2) end
  return new_blob(pycall_or_raise(2, "b64d", s))
end
-- Base58 (Bitcoin's alphabet, no check bytes): quadratic in the length, so capped.
local MAX_B58 = 8192
function Blob.from_base58(s)
  if type(s) ~= "string" then error("Blob.from_base58: expected a string", 2) end
  if #s > MAX_B58 then error(s_format("Blob.from_base58: at most %d characters", MAX_B58), 2) end
  return new_blob(pycall_or_raise(2, "b58d", s))
end
function blob_methods.base58(b)
  local s = self_bytes(b, "base58")
  if #s > MAX_B58 then error(s_format("Blob:base58: at most %d bytes", MAX_B58), 2) end
  return pycall_or_raise(2, "b58e", s)
end
function Blob.random(n)
  if type(n) == "table" then
    if n.bytes ~= nil then n = n.bytes
    elseif n.bits ~= nil then
      if m_type(n.bits) ~= "integer" or n.bits % 8 ~= 0 then
        error("Blob.random: bits must be a multiple of 8", 2)
      end
      n = n.bits // 8
    end
  end
  if m_type(n) ~= "integer" or n < 0 or n > 1048576 then
    error("Blob.random: give a byte count from 0 to 1048576", 2)
  end
  return new_blob(pycall_or_raise(2, "rand", n))
end

function blob_methods.bytes(b) return self_bytes(b, "bytes") end
function blob_methods.hex(b) return pycall_or_raise(2, "hexe", self_bytes(b, "hex")) end
function blob_methods.base64(b) return pycall_or_raise(2, "b64e", self_bytes(b, "base64")) end
function blob_methods.base64_urlsafe(b)
  return pycall_or_raise(2, "b64u", self_bytes(b, "base64_urlsafe"))
end
function blob_methods.slice(b, i, j)
  local s = self_bytes(b, "slice")
  -- A float with an integral value counts (DSM's plugins pass n / 2 and the like).
  local ii, jj = m_toint(i), -1
  if j ~= nil then jj = m_toint(j) end
  if ii == nil or jj == nil then
    error("Blob:slice: indices must be integers", 2)
  end
  i, j = ii, jj
  return new_blob(s_sub(s, i, j))
end

local function blob_bitop(op)
  return function(a, b)
    local x, y = BYTES[a], BYTES[b]
    if x == nil or y == nil then error("bitwise operation on a Blob and a non-Blob", 2) end
    if #x ~= #y then error("bitwise operation on Blobs of different lengths", 2) end
    return new_blob(pycall_or_raise(2, op, x, y))
  end
end
Blob_mt.__band = blob_bitop("and")
Blob_mt.__bor = blob_bitop("or")
Blob_mt.__bxor = blob_bitop("xor")
Blob_mt.__len = function(b) return #BYTES[b] end
Blob_mt.__eq = function(a, b)
  local x, y = BYTES[a], BYTES[b]
  return x ~= nil and x == y
end
Blob_mt.__concat = function(a, b)
  return new_blob(bytes_of(a, "Blob ..", 2) .. bytes_of(b, "Blob ..", 2))
end
Blob_mt.__tostring = function(b) return "Blob(" .. #BYTES[b] .. " bytes)" end

------------------------------------------------------------------------------
-- Error
local Error = {}
local Error_mt = { __metatable = "Error" }
Error_mt.__tostring = function(e) return tostring(rawget(e, "message")) end

local function new_error(status, message, code)
  local e = setmetatable({ status = status, message = message, error = code }, Error_mt)
  ERRORS[e] = true
  return e
end

function Error.new(arg)
  if type(arg) == "table" then
    local status = arg.status
    if status ~= nil and (m_type(status) ~= "integer" or status < 400 or status > 599) then
      error("Error.new: status must be an integer from 400 to 599", 2)
    end
    return new_error(status or 400, tostring(arg.message or ""), arg.error)
  end
  return new_error(400, tostring(arg))
end

------------------------------------------------------------------------------
-- msgpack codec: the only format that crosses the channel.
-- Lua -> msgpack: a table whose keys are exactly 1..n is an array; any other
-- table is a map, and an empty table is an empty map ({}), as DSM's json
-- encodes it. Number keys become strings (JSON semantics); a string that is
-- not valid UTF-8 travels as bin; a Blob is bin; null and nil are nil.
-- msgpack -> Lua: maps and arrays are tables (arrays 1-based), bin is a
-- Blob, nil is `null` (so arrays keep their holes).
local TOO_LARGE = {}

-- Lua 5.3's utf8.len accepts UTF-16 surrogates (U+D800..U+DFFF, bytes ED A0..BF),
-- which msgpack readers refuse as "str": such a string made the daemon drop the
-- worker as broken. They travel as bin, like any other non-UTF-8 string.
local function is_utf8(s)
  return utf8_len(s) ~= nil and not s_find(s, "\237[\160-\191]")
end

local function mp_encode(root, limit, too_large)
  local buf, n, size = {}, 0, 0
  local seen = {}
  local function put(s)
    n = n + 1
    buf[n] = s
    size = size + #s
    if size > limit then error(too_large, 0) end
  end
  local function put_str(s)
    local len = #s
    if len < 32 then put(s_char(0xa0 + len))
    elseif len < 256 then put("\217" .. s_char(len))
    elseif len < 65536 then put(s_pack(">BI2", 0xda, len))
    else put(s_pack(">BI4", 0xdb, len)) end
    put(s)
  end
  local function put_bin(s)
    local len = #s
    if len < 256 then put("\196" .. s_char(len))
    elseif len < 65536 then put(s_pack(">BI2", 0xc5, len))
    else put(s_pack(">BI4", 0xc6, len)) end
    put(s)
  end
  local enc
  function enc(v, depth)
    local tv = type(v)
    if v == nil or rawequal(v, null) then put("\192")
    elseif tv == "boolean" then put(v and "\195" or "\194")
    elseif tv == "number" then
      if m_type(v) == "integer" then
        if v >= 0 then
          if v < 128 then put(s_char(v))
          elseif v < 0x100 then put(s_pack(">BI1", 0xcc, v))
          elseif v < 0x10000 then put(s_pack(">BI2", 0xcd, v))
          elseif v < 0x100000000 then put(s_pack(">BI4", 0xce, v))
          else put(s_pack(">Bi8", 0xd3, v)) end
        elseif v >= -32 then put(s_char(v + 256))
        elseif v >= -128 then put(s_pack(">Bi1", 0xd0, v))
        elseif v >= -32768 then put(s_pack(">Bi2", 0xd1, v))
        elseif v >= -2147483648 then put(s_pack(">Bi4", 0xd2, v))
        else put(s_pack(">Bi8", 0xd3, v)) end
      else
        put(s_pack(">Bd", 0xcb, v))
      end
    elseif tv == "string" then
      if is_utf8(v) then put_str(v) else put_bin(v) end
    elseif tv == "table" then
      local b = BYTES[v]
      if b ~= nil then return put_bin(b) end
      if TIMES[v] then error("cannot encode a Time value; use :to_iso8601()", 0) end
      if depth > MAX_DEPTH then error("value nested too deeply to encode", 0) end
      if seen[v] then error("cannot encode a table that contains itself", 0) end
      seen[v] = true
      local cnt, max, arr = 0, 0, true
      for k in next, v do
        cnt = cnt + 1
        if arr then
          if m_type(k) == "integer" and k >= 1 then
            if k > max then max = k end
          else
            arr = false
          end
        end
      end
      -- An empty table is a map, unless it is marked as an array (an empty key_ops).
      if arr and max == cnt and (cnt > 0 or getmetatable(v) == "Array") then
        if cnt < 16 then put(s_char(0x90 + cnt))
        elseif cnt < 65536 then put(s_pack(">BI2", 0xdc, cnt))
        else put(s_pack(">BI4", 0xdd, cnt)) end
        for i = 1, cnt do enc(rawget(v, i), depth + 1) end
      else
        if cnt < 16 then put(s_char(0x80 + cnt))
        elseif cnt < 65536 then put(s_pack(">BI2", 0xde, cnt))
        else put(s_pack(">BI4", 0xdf, cnt)) end
        for k, x in next, v do
          local tk = type(k)
          if tk == "string" then
            if not is_utf8(k) then error("cannot encode a table key that is not UTF-8", 0) end
            put_str(k)
          elseif tk == "number" then
            put_str(m_type(k) == "integer" and s_format("%d", k) or s_format("%.17g", k))
          else
            error("cannot encode a table key of type " .. tk, 0)
          end
          enc(x, depth + 1)
        end
      end
      seen[v] = nil
    else
      error("cannot encode a " .. tv .. " value", 0)
    end
  end
  enc(root, 0)
  return t_concat(buf)
end

local function mp_decode(s)
  local pos = 1
  local dec
  local function take(len)
    local v = s_sub(s, pos, pos + len - 1)
    if #v ~= len then error("truncated msgpack", 0) end
    pos = pos + len
    return v
  end
  local function num(fmt)
    local v
    v, pos = s_unpack(fmt, s, pos)
    return v
  end
  local function arr(len, depth)
    local t = {}
    for i = 1, len do t[i] = dec(depth + 1) end
    return t
  end
  local function map(len, depth)
    local t = {}
    for _ = 1, len do
      local k = dec(depth + 1)
      if rawequal(k, null) then error("msgpack map with a nil key", 0) end
      t[k] = dec(depth + 1)
    end
    return t
  end
  function dec(depth)
    if depth > MAX_DEPTH then error("msgpack value nested too deeply", 0) end
    local b = s_byte(s, pos)
    if b == nil then error("truncated msgpack", 0) end
    pos = pos + 1
    if b < 0x80 then return b
    elseif b >= 0xe0 then return b - 256
    elseif b >= 0xa0 and b < 0xc0 then return take(b - 0xa0)
    elseif b >= 0x90 and b < 0xa0 then return arr(b - 0x90, depth)
    elseif b >= 0x80 and b < 0x90 then return map(b - 0x80, depth)
    elseif b == 0xc0 then return null
    elseif b == 0xc2 then return false
    elseif b == 0xc3 then return true
    elseif b == 0xc4 then return new_blob(take(num("B")))
    elseif b == 0xc5 then return new_blob(take(num(">I2")))
    elseif b == 0xc6 then return new_blob(take(num(">I4")))
    elseif b == 0xca then return num(">f")
    elseif b == 0xcb then return num(">d")
    elseif b == 0xcc then return num("B")
    elseif b == 0xcd then return num(">I2")
    elseif b == 0xce then return num(">I4")
    elseif b == 0xcf then
      -- uint64: Lua 5.3 has no unsigned integers, and reading it as int64 turned
      -- 2^64 - 1 into -1; values past math.maxinteger become (positive) floats.
      local v = num(">i8")
      if v < 0 then return v + 18446744073709551616.0 end
      return v
    elseif b == 0xd0 then return num(">i1")
    elseif b == 0xd1 then return num(">i2")
    elseif b == 0xd2 then return num(">i4")
    elseif b == 0xd3 then return num(">i8")
    elseif b == 0xd9 then return take(num("B"))
    elseif b == 0xda then return take(num(">I2"))
    elseif b == 0xdb then return take(num(">I4"))
    elseif b == 0xdc then return arr(num(">I2"), depth)
    elseif b == 0xdd then return arr(num(">I4"), depth)
    elseif b == 0xde then return map(num(">I2"), depth)
    elseif b == 0xdf then return map(num(">I4"), depth)
    end
    error(s_format("unsupported msgpack type 0x%02x", b), 0)
  end
  local v = dec(0)
  if pos <= #s then error("trailing bytes after msgpack value", 0) end
  return v
end

local MAX_CALL = 4 * 1024 * 1024

------------------------------------------------------------------------------
-- json, cbor: encoded and decoded by the worker (Python), under size limits.
local function codec_encode(op, v, level)
  local ok, packed = pcall(mp_encode, v, MAX_CALL, "value too large to encode")
  if not ok then error(packed, level + 1) end
  return pycall_or_raise(level + 1, op, packed)
end
local function codec_decode(op, s, level)
  local packed = pycall_or_raise(level + 1, op, s)
  local ok, v = pcall(mp_decode, packed)
  if not ok then error(v, level + 1) end
  return v
end

local json = {}
function json.encode(v) return codec_encode("json_e", v, 2) end
function json.decode(s)
  -- DSM's request{} answers with a Blob body that plugins hand straight to json.decode.
  if BYTES[s] ~= nil then s = BYTES[s] end
  if type(s) ~= "string" then error("json.decode: expected a string or a Blob", 2) end
  return codec_decode("json_d", s, 2)
end
local cbor = {}
function cbor.encode(v) return new_blob(codec_encode("cbor_e", v, 2)) end
function cbor.decode(s) return codec_decode("cbor_d", bytes_of(s, "cbor.decode", 2), 2) end

------------------------------------------------------------------------------
-- Time (nanoseconds since the epoch, kept privately)
local Time = {}
local time_methods = {}
local Time_mt = { __metatable = "Time", __index = time_methods }
-- Nanoseconds in a 64-bit integer reach 1677..2262; beyond that a Time is an
-- error, never a value that wrapped around.
local NS_MAX = math.maxinteger
local function ns_in_range(x, name, level)
  if x ~= x or x >= 9.2233720368547758e18 or x < -9.2233720368547758e18 then
    error("Time" .. name .. ": out of range (years 1678 to 2262)", level + 1)
  end
  return m_floor(x)
end
local function new_time(ns)
  local t = setmetatable({}, Time_mt)
  TIMES[t] = ns
  return t
end
local function ns_of(t, name)
  local ns = TIMES[t]
  if ns == nil then error("Time:" .. name .. ": not a Time", 3) end
  return ns
end
function Time.now_insecure() return new_time(pycall_or_raise(2, "now")) end
function Time.at(secs)
  if type(secs) ~= "number" then error("Time.at: expected a number of seconds", 2) end
  return new_time(ns_in_range(secs * 1000000000, ".at", 2))
end
function Time.from_iso8601(s)
  if type(s) ~= "string" then error("Time.from_iso8601: expected a string", 2) end
  return new_time(pycall_or_raise(2, "iso_p", s))
end
function time_methods.unix_epoch_seconds(t) return ns_of(t, "unix_epoch_seconds") // 1000000000 end
function time_methods.unix_epoch_nanoseconds(t) return ns_of(t, "unix_epoch_nanoseconds") end
function time_methods.to_iso8601(t) return pycall_or_raise(2, "iso_f", ns_of(t, "to_iso8601")) end
function time_methods.add_seconds(t, n)
  if type(n) ~= "number" then error("Time:add_seconds: expected a number", 2) end
  local ns, delta = ns_of(t, "add_seconds"), ns_in_range(n * 1000000000, ":add_seconds", 2)
  if (delta > 0 and ns > NS_MAX - delta) or (delta < 0 and ns < -NS_MAX - 1 - delta) then
    error("Time:add_seconds: out of range (years 1678 to 2262)", 2)
  end
  return new_time(ns + delta)
end
Time_mt.__eq = function(a, b) return TIMES[a] ~= nil and TIMES[a] == TIMES[b] end
Time_mt.__lt = function(a, b) return ns_of(a, "<") < ns_of(b, "<") end
Time_mt.__le = function(a, b) return ns_of(a, "<=") <= ns_of(b, "<=") end
Time_mt.__tostring = function(t) return time_methods.to_iso8601(t) end
-- strftime in UTC (Python's), e.g. t:fmt("%Y-%m-%dT%H:%M:%SZ").
function time_methods.fmt(t, f)
  if type(f) ~= "string" or #f > 256 then error("Time:fmt: expected a format string (at most 256 bytes)", 2) end
  return pycall_or_raise(2, "time_f", ns_of(t, "fmt"), f)
end
-- Time + seconds, seconds + Time, Time - seconds; Time - Time is seconds (a float when not whole).
Time_mt.__add = function(a, b)
  if TIMES[a] == nil then a, b = b, a end
  if TIMES[a] == nil or type(b) ~= "number" then error("Time +: expected a Time and a number", 2) end
  return time_methods.add_seconds(a, b)
end
Time_mt.__sub = function(a, b)
  if TIMES[a] ~= nil and TIMES[b] ~= nil then
    local d = TIMES[a] - TIMES[b]
    if d % 1000000000 == 0 then return d // 1000000000 end
    return d / 1e9
  end
  if TIMES[a] == nil or type(b) ~= "number" then error("Time -: expected a Time and a number", 2) end
  return time_methods.add_seconds(a, -b)
end

------------------------------------------------------------------------------
-- BigNum: arbitrary-precision integers, computed with Python integers in the
-- worker. Held privately as a signed hex string. Operands and results are
-- limited to MAX_BN_BITS, so a huge number is refused, not computed.
local BIGNUMS = setmetatable({}, { __mode = "k" })
local MAX_BN_BITS = 16384
local MAX_BN_BYTES = MAX_BN_BITS // 8
local BigNum = {}
local bn_methods = {}
local BigNum_mt = { __metatable = "BigNum", __index = bn_methods }

local function new_bn(h)
  local b = setmetatable({}, BigNum_mt)
  BIGNUMS[b] = h
  return b
end

-- The hex of a BigNum operand (a BigNum, or a Lua integer).
local function bn_hex(v, what, level)
  local h = BIGNUMS[v]
  if h ~= nil then return h end
  if m_type(v) == "integer" then
    if v < 0 then return s_format("-%x", -v) end
    return s_format("%x", v)
  end
  error(what .. ": expected a BigNum or an integer, got " .. type(v), level + 1)
end

local function bn_op(level, op, a, b, c)
  charge(#a + (type(b) == "string" and #b or 0))
  return pycall_or_raise(level + 1, "bn", op, a, b and (c and (b .. ":" .. c) or b) or nil)
end

function BigNum.from_bytes_be(b)
  local s = bytes_of(b, "BigNum.from_bytes_be", 2)
  if #s > MAX_BN_BYTES then
    error(s_format("BigNum.from_bytes_be: at most %d bytes (%d bits)", MAX_BN_BYTES, MAX_BN_BITS), 2)
  end
  return new_bn(bn_op(2, "frombytes", s))
end
function BigNum.from_int(n)
  if m_type(n) ~= "integer" then
    n = m_toint(n)
    if n == nil then error("BigNum.from_int: expected an integer", 2) end
  end
  return new_bn(bn_hex(n, "BigNum.from_int", 2))
end
function bn_methods.to_bytes_be(b)
  return new_blob(bn_op(2, "tobytes", bn_hex(b, "BigNum:to_bytes_be", 2)))
end
function bn_methods.to_bytes_be_zero_pad(b, n)
  n = m_toint(n) -- 4.0 counts as 4 (DSM's plugins pass size / 2)
  if n == nil or n < 0 or n > MAX_BN_BYTES then
    error(s_format("BigNum:to_bytes_be_zero_pad: give a length from 0 to %d", MAX_BN_BYTES), 2)
  end
  return new_blob(bn_op(2, "tobytes", bn_hex(b, "BigNum:to_bytes_be_zero_pad", 2), tostring(n)))
end
function bn_methods.copy(b) return new_bn(bn_hex(b, "BigNum:copy", 2)) end
function bn_methods.bits(b) return bn_op(2, "bits", bn_hex(b, "BigNum:bits", 2)) end
function bn_methods.to_int(b) return bn_op(2, "toint", bn_hex(b, "BigNum:to_int", 2)) end
function bn_methods.to_dec(b) return bn_op(2, "dec", bn_hex(b, "BigNum:to_dec", 2)) end
function bn_methods.mod_exp(b, e, m)
  return new_bn(bn_op(2, "modexp", bn_hex(b, "BigNum:mod_exp", 2), bn_hex(e, "BigNum:mod_exp", 2),
    bn_hex(m, "BigNum:mod_exp", 2)))
end
function bn_methods.mod_inverse(b, m)
  return new_bn(bn_op(2, "modinv", bn_hex(b, "BigNum:mod_inverse", 2), bn_hex(m, "BigNum:mod_inverse", 2)))
end

-- In place, as DSM's: a:add(b) changes a (and returns it).
for _, name in ipairs({ "add", "sub", "mul", "div", "mod" }) do
  local what = "BigNum:" .. name
  bn_methods[name] = function(a, b)
    if BIGNUMS[a] == nil then error(what .. ": not a BigNum", 2) end
    BIGNUMS[a] = bn_op(2, name, BIGNUMS[a], bn_hex(b, what, 2))
    return a
  end
end
-- Operators give new BigNums.
for mm, name in next, { __add = "add", __sub = "sub", __mul = "mul", __div = "div",
  __idiv = "div", __mod = "mod" } do
  BigNum_mt[mm] = function(a, b)
    return new_bn(bn_op(2, name, bn_hex(a, "BigNum " .. name, 2), bn_hex(b, "BigNum " .. name, 2)))
  end
end
BigNum_mt.__unm = function(a) return new_bn(bn_op(2, "sub", "0", bn_hex(a, "BigNum -", 2))) end
local function bn_cmp(a, b, what)
  return bn_op(3, "cmp", bn_hex(a, what, 3), bn_hex(b, what, 3))
end
BigNum_mt.__eq = function(a, b)
  return BIGNUMS[a] ~= nil and BIGNUMS[b] ~= nil and BIGNUMS[a] == BIGNUMS[b]
end
BigNum_mt.__lt = function(a, b) return bn_cmp(a, b, "BigNum <") < 0 end
BigNum_mt.__le = function(a, b) return bn_cmp(a, b, "BigNum <=") <= 0 end
BigNum_mt.__tostring = function(a) return bn_op(2, "dec", bn_hex(a, "tostring", 2)) end
bn_methods.cmp = function(a, b) return bn_cmp(a, b, "BigNum:cmp") end

------------------------------------------------------------------------------
-- EcGroup / EcPoint: named curves; points as SEC1 bytes. Multiplication is
-- of the group's generator only (cryptography's key derivation does it).
local EC_GROUPS = setmetatable({}, { __mode = "k" })
local EC_POINTS = setmetatable({}, { __mode = "k" })
local EcGroup = {}
local ecg_methods = {}
local EcGroup_mt = { __metatable = "EcGroup", __index = ecg_methods }
local EcPoint = {}
local ecp_methods = {}
local EcPoint_mt = { __metatable = "EcPoint", __index = ecp_methods }

local function new_point(curve, sec1, gen)
  local p = setmetatable({}, EcPoint_mt)
  EC_POINTS[p] = { curve = curve, sec1 = sec1, gen = gen }
  return p
end
function EcGroup.from_name(name)
  if type(name) ~= "string" then error("EcGroup.from_name: expected a curve name", 2) end
  local canon = pycall_or_raise(2, "ec_name", name)
  local g = setmetatable({}, EcGroup_mt)
  EC_GROUPS[g] = canon
  return g
end
local function group_of(g, what)
  local c = EC_GROUPS[g]
  if c == nil then error(what .. ": not an EcGroup", 3) end
  return c
end
function ecg_methods.name(g) return group_of(g, "EcGroup:name") end
function ecg_methods.generator(g)
  local c = group_of(g, "EcGroup:generator")
  return new_point(c, pycall_or_raise(2, "ec_gen", c), true)
end
function ecg_methods.order(g)
  return new_bn(pycall_or_raise(2, "ec_order", group_of(g, "EcGroup:order")))
end
function EcPoint.from_binary(g, b)
  local c = group_of(g, "EcPoint.from_binary")
  local s = bytes_of(b, "EcPoint.from_binary", 2)
  return new_point(c, pycall_or_raise(2, "ec_point", c, s), false)
end
local function point_of(p, what)
  local v = EC_POINTS[p]
  if v == nil then error(what .. ": not an EcPoint", 3) end
  return v
end
function ecp_methods.mul(p, k)
  local v = point_of(p, "EcPoint:mul")
  if not v.gen then
    error("EcPoint:mul: only the group's generator can be multiplied (generator():mul(k))", 2)
  end
  return new_point(v.curve, pycall_or_raise(2, "ec_mul", v.curve, bn_hex(k, "EcPoint:mul", 2)),
    false)
end
-- Compressed SEC1 (0x02/0x03 || x), as BIP32 serializes points; to_binary(false): 0x04 || x || y.
function ecp_methods.to_binary(p, compressed)
  local v = point_of(p, "EcPoint:to_binary")
  if compressed == false then return new_blob(v.sec1) end
  return new_blob(pycall_or_raise(2, "ec_compress", v.curve, v.sec1))
end
function ecp_methods.x(p)
  local s = point_of(p, "EcPoint:x").sec1
  return BigNum.from_bytes_be(s_sub(s, 2, (#s - 1) // 2 + 1))
end
function ecp_methods.y(p)
  local s = point_of(p, "EcPoint:y").sec1
  return BigNum.from_bytes_be(s_sub(s, (#s - 1) // 2 + 2))
end
EcPoint_mt.__eq = function(a, b)
  local x, y = EC_POINTS[a], EC_POINTS[b]
  return x ~= nil and y ~= nil and x.curve == y.curve and x.sec1 == y.sec1
end

------------------------------------------------------------------------------
-- The REST API, as the plugin's principal, over the worker's channel.
local function api(method, path, body)
  local ok, frame = pcall(mp_encode, { t = "call", method = method, path = path, body = body },
    MAX_CALL, "request too large")
  if not ok then return nil, new_error(400, tostring(frame), "too_large") end
  local reply, err = pycall("call", frame)
  if reply == nil then return nil, new_error(500, err, "internal") end
  local ok2, r = pcall(mp_decode, reply)
  if not ok2 or type(r) ~= "table" then return nil, new_error(500, "bad reply", "internal") end
  local status, rbody = r.status, r.body
  if m_type(status) ~= "integer" or status >= 400 then
    local msg, code = "request failed", "internal"
    if type(rbody) == "table" then
      if type(rbody.message) == "string" then msg = rbody.message end
      if type(rbody.error) == "string" then code = rbody.error end
    end
    return nil, new_error(m_type(status) == "integer" and status or 500, msg, code)
  end
  if rawequal(rbody, null) then return nil end
  return rbody
end

local BINARY = {
  plain = true, cipher = true, iv = true, ad = true, tag = true, data = true, hash = true,
  signature = true, mac = true, value = true, wrapped_key = true,
}

-- A request body from a plugin's argument table: shallow copy, base64 strings
-- of the known binary fields decoded.
local function body_of(t, extra)
  local b = {}
  if t ~= nil then
    if type(t) ~= "table" then return nil, "expected a table of request fields" end
    for k, v in pairs(t) do
      if BINARY[k] and type(v) == "string" then
        local raw, err = pycall("b64d", v)
        if raw == nil then return nil, s_format("field %s: %s", k, err) end
        v = new_blob(raw)
      elseif k == "key_ops" and type(v) == "table" and next(v) == nil then
        v = setmetatable({}, { __metatable = "Array" }) -- {} means no operations, not a map
      end
      b[k] = v
    end
  end
  if extra then for k, v in next, extra do b[k] = v end end
  return b
end

local sobject_methods = {}
local Sobject_mt = { __metatable = "Sobject", __index = sobject_methods }
local function as_sobject(v)
  if type(v) == "table" and not BYTES[v] then
    setmetatable(v, Sobject_mt)
    SOBJECTS[v] = true
  end
  return v
end

local function descriptor(so)
  if type(so) ~= "table" then return nil end
  local tk = rawget(so, "transient_key")
  if tk ~= nil then return { transient_key = tk } end
  if SOBJECTS[so] then return { kid = rawget(so, "kid") } end
  return so -- already a descriptor table
end

local function call(method, path, t, extra, wrap)
  local b, err = body_of(t, extra)
  if b == nil then return nil, new_error(400, err, "invalid_field") end
  local r, e = api(method, path, b)
  if r == nil then return nil, e end
  if wrap then return as_sobject(r) end
  return r
end

local function op(path, wrap)
  return function(self, t)
    return call("POST", path, t, { key = descriptor(self) }, wrap)
  end
end
sobject_methods.encrypt = op("/crypto/v1/encrypt")
sobject_methods.decrypt = op("/crypto/v1/decrypt")
sobject_methods.sign = op("/crypto/v1/sign")
sobject_methods.verify = op("/crypto/v1/verify")
sobject_methods.mac = op("/crypto/v1/mac")
sobject_methods.mac_verify = op("/crypto/v1/macverify")
sobject_methods.unwrap = op("/crypto/v1/unwrapkey", true)
function sobject_methods.wrap(self, t)
  local subject = type(t) == "table" and descriptor(t.subject) or nil
  return call("POST", "/crypto/v1/wrapkey", t, { key = descriptor(self), subject = subject })
end
function sobject_methods.agree(self, t)
  local pub = type(t) == "table" and descriptor(t.public_key) or nil
  return call("POST", "/crypto/v1/agree", t, { private_key = descriptor(self), public_key = pub },
    true)
end
function sobject_methods.export(self)
  return call("POST", "/crypto/v1/keys/export", nil, descriptor(self), true)
end
local function kid_path(self)
  local kid = rawget(self, "kid") or rawget(self, "transient_key")
  if type(kid) ~= "string" then return nil end
  return "/crypto/v1/keys/" .. kid
end
function sobject_methods.update(self, t)
  local path = kid_path(self)
  if not path then return nil, new_error(400, "not an sobject", "invalid_field") end
  return call("PATCH", path, t, nil, true)
end
function sobject_methods.delete(self)
  local path = kid_path(self)
  if not path then return nil, new_error(400, "not an sobject", "invalid_field") end
  local _, e = api("DELETE", path, nil)
  if e then return nil, e end
  return true
end
function sobject_methods.persist(self, t)
  return call("POST", "/crypto/v1/keys/persist", t, { key = descriptor(self) }, true)
end

-- {public_modulus=BigNum, public_exponent=BigNum} from the key's public key.
function sobject_methods.rsa_public_info(self)
  local pub = type(self) == "table" and rawget(self, "pub_key") or nil
  if BYTES[pub] == nil then
    local info, e = call("POST", "/crypto/v1/keys/info", nil, descriptor(self))
    if info == nil then return nil, e end
    pub = info.pub_key
  end
  if BYTES[pub] == nil then return nil, new_error(400, "the key has no public key", "invalid_field") end
  local r, err = pycall("rsa_pub", BYTES[pub])
  if r == nil then return nil, new_error(400, err, "invalid_field") end
  local colon = s_find(r, ":", 1, true)
  return { public_modulus = new_bn(s_sub(r, 1, colon - 1)), public_exponent = new_bn(s_sub(r, colon + 1)) }
end

local Sobject = {}
function Sobject.create(t) return call("POST", "/crypto/v1/keys", t, nil, true) end
function Sobject.import(t) return call("PUT", "/crypto/v1/keys", t, nil, true) end
function Sobject.get_all(t)
  local r, e = call("GET", "/crypto/v1/keys", t)
  if r == nil then return nil, e end
  for i = 1, #r do as_sobject(r[i]) end
  return r
end
setmetatable(Sobject, {
  __metatable = "Sobject",
  __call = function(_, t)
    if type(t) ~= "table" then return nil, new_error(400, "Sobject: expected {name=} or {kid=}") end
    local d = {}
    if t.id ~= nil then d.kid = t.id end
    for _, k in ipairs({ "kid", "name", "transient_key" }) do
      if t[k] ~= nil then d[k] = t[k] end
    end
    return call("POST", "/crypto/v1/keys/info", nil, d, true)
  end,
})

local function digest(t)
  if type(t) ~= "table" then return nil, new_error(400, "digest: expected {alg=, data=}") end
  -- RIPEMD160 (Bitcoin's HASH160) is keyless and not in the daemon's digest route:
  -- computed here, in the worker.
  if type(t.alg) == "string" and s_upper(t.alg) == "RIPEMD160" then
    local data = BYTES[t.data] or t.data
    if type(data) ~= "string" then return nil, new_error(400, "digest: data must be a Blob") end
    if #data > MAX_CALL then return nil, new_error(413, "digest: data too large", "too_large") end
    charge(#data // 64)
    return { digest = new_blob(pycall_or_raise(2, "ripemd", data)) }
  end
  return call("POST", "/crypto/v1/digest", { alg = t.alg, data = t.data })
end

------------------------------------------------------------------------------
-- X.509 pieces: Oid, X509Name, DerEncoder, IpAddr, Pkcs10Csr. DER is built in
-- the worker (bounded: entries, depth, size); signatures are made by the daemon
-- with Sobject:sign, so no key ever reaches the worker.
local OIDS = setmetatable({}, { __mode = "k" })
local Oid = {}
local oid_methods = {}
local Oid_mt = { __metatable = "Oid", __index = oid_methods }
function Oid.from_str(name)
  if type(name) ~= "string" or #name > 256 then error("Oid.from_str: expected a name or dotted OID", 2) end
  local o = setmetatable({}, Oid_mt)
  OIDS[o] = pycall_or_raise(2, "oid", name)
  return o
end
function oid_methods.to_str(o) return OIDS[o] end
Oid_mt.__tostring = function(o) return OIDS[o] end
Oid_mt.__eq = function(a, b) return OIDS[a] ~= nil and OIDS[a] == OIDS[b] end
local function oid_of(v, what, level)
  if OIDS[v] then return OIDS[v] end
  if type(v) == "string" then return pycall_or_raise(level + 1, "oid", v) end
  error(what .. ": expected an Oid", level + 1)
end

local NAMES = setmetatable({}, { __mode = "k" })
local X509Name = {}
local name_methods = {}
local X509Name_mt = { __metatable = "X509Name", __index = name_methods }
function X509Name.new()
  local n = setmetatable({}, X509Name_mt)
  NAMES[n] = {}
  return n
end
function name_methods.set(n, oid, value, kind)
  local e = NAMES[n]
  if e == nil then error("X509Name:set: not an X509Name", 2) end
  if type(value) ~= "string" or #value > 1024 then error("X509Name:set: expected a string value", 2) end
  if #e >= 64 then error("X509Name:set: at most 64 entries", 2) end
  e[#e + 1] = { oid_of(oid, "X509Name:set", 2), value, kind or "utf8" }
  return n
end
function name_methods.to_der(n)
  local ok, packed = pcall(mp_encode, NAMES[n], MAX_CALL, "name too large")
  if not ok then error(packed, 2) end
  return pycall_or_raise(2, "x509_name", packed)
end

local IPS = setmetatable({}, { __mode = "k" })
local IpAddr = {}
local IpAddr_mt = { __metatable = "IpAddr", __index = {
  octets = function(a) return IPS[a] end,
} }
function IpAddr.new(text)
  if type(text) ~= "string" or #text > 64 then error("IpAddr.new: expected an address", 2) end
  local a = setmetatable({}, IpAddr_mt)
  IPS[a] = pycall_or_raise(2, "ip", text)
  return a
end

-- DerEncoder: a builder of DER, in trusted Lua. implicit_context(n) retags the
-- next primitive item as [n]; start_seq/start_set ... end_seq/end_set nest.
local DER_MAX_DEPTH, DER_MAX_BYTES = 64, 1048576
local ENCODERS = setmetatable({}, { __mode = "k" })
local DerEncoder = {}
local der_methods = {}
local DerEncoder_mt = { __metatable = "DerEncoder", __index = der_methods }
local function der_len(n)
  if n < 0x80 then return s_char(n) end
  local b = s_pack(">I4", n)
  local i = 1
  while s_byte(b, i) == 0 do i = i + 1 end
  return s_char(0x80 + 5 - i) .. s_sub(b, i)
end
local function der_tlv(tag, content) return s_char(tag) .. der_len(#content) .. content end
function DerEncoder.new()
  local d = setmetatable({}, DerEncoder_mt)
  ENCODERS[d] = { stack = { { parts = {}, size = 0 } }, implicit = nil }
  return d
end
local function enc_of(d, what)
  local st = ENCODERS[d]
  if st == nil then error("DerEncoder:" .. what .. ": not a DerEncoder", 3) end
  return st
end
local function der_add(d, what, tag, content)
  local st = enc_of(d, what)
  if st.implicit then
    tag = 0x80 | st.implicit | (tag & 0x20)
    st.implicit = nil
  end
  local top = st.stack[#st.stack]
  local item = der_tlv(tag, content)
  top.size = top.size + #item
  if top.size > DER_MAX_BYTES then error("DerEncoder: more than " .. DER_MAX_BYTES .. " bytes", 3) end
  top.parts[#top.parts + 1] = item
  return d
end
function der_methods.implicit_context(d, n)
  if m_type(n) ~= "integer" or n < 0 or n > 30 then error("DerEncoder:implicit_context: 0 to 30", 2) end
  enc_of(d, "implicit_context").implicit = n
  return d
end
local function der_start(d, what, tag)
  local st = enc_of(d, what)
  if #st.stack > DER_MAX_DEPTH then error("DerEncoder: nested more than " .. DER_MAX_DEPTH .. " deep", 3) end
  st.stack[#st.stack + 1] = { parts = {}, size = 0, tag = tag, implicit = st.implicit }
  st.implicit = nil
  return d
end
local function der_end(d, what, tag)
  local st = enc_of(d, what)
  local top = st.stack[#st.stack]
  if #st.stack < 2 or top.tag ~= tag then error("DerEncoder:" .. what .. ": nothing to close", 3) end
  st.stack[#st.stack] = nil
  st.implicit = top.implicit
  local parts = top.parts
  if tag == 0x31 then t_sort(parts) end
  return der_add(d, what, tag, t_concat(parts))
end
function der_methods.start_seq(d) return der_start(d, "start_seq", 0x30) end
function der_methods.end_seq(d) return der_end(d, "end_seq", 0x30) end
function der_methods.start_set(d) return der_start(d, "start_set", 0x31) end
function der_methods.end_set(d) return der_end(d, "end_set", 0x31) end
local STRING_TAGS = { utf8 = 0x0C, printable = 0x13, ia5 = 0x16, numeric = 0x12, t61 = 0x14 }
function der_methods.add_string(d, s, kind)
  local tag = STRING_TAGS[kind or "utf8"]
  if tag == nil or type(s) ~= "string" then error("DerEncoder:add_string: (string, 'utf8'|'printable'|'ia5'|...)", 2) end
  return der_add(d, "add_string", tag, s)
end
function der_methods.add_octets(d, b) return der_add(d, "add_octets", 0x04, bytes_of(b, "DerEncoder:add_octets", 2)) end
function der_methods.add_oid(d, o)
  local der = pycall_or_raise(2, "oid_der", oid_of(o, "DerEncoder:add_oid", 2))
  return der_add(d, "add_oid", 0x06, s_sub(der, 3))
end
function der_methods.add_bool(d, v) return der_add(d, "add_bool", 0x01, v and "\255" or "\0") end
function der_methods.add_null(d) return der_add(d, "add_null", 0x05, "") end
function der_methods.add_integer(d, v)
  local h = bn_hex(v, "DerEncoder:add_integer", 2)
  local raw = bn_op(2, "tobytes", (s_sub(h, 1, 1) == "-") and error("DerEncoder:add_integer: negative", 2) or h)
  if s_byte(raw, 1) >= 0x80 then raw = "\0" .. raw end
  return der_add(d, "add_integer", 0x02, raw)
end
function der_methods.add_der(d, b)
  local st = enc_of(d, "add_der")
  local s = bytes_of(b, "DerEncoder:add_der", 2)
  local top = st.stack[#st.stack]
  top.size = top.size + #s
  if top.size > DER_MAX_BYTES then error("DerEncoder: more than " .. DER_MAX_BYTES .. " bytes", 2) end
  top.parts[#top.parts + 1] = s
  return d
end
function der_methods.value(d)
  local st = enc_of(d, "value")
  if #st.stack ~= 1 then error("DerEncoder:value: a sequence or set is still open", 2) end
  return t_concat(st.stack[1].parts)
end

-- Pkcs10Csr.builder(): with_subject, with_signer_sobject, with_hash_alg,
-- add_extension, append_attribute, build() -> csr with :to_der().
local CSRS = setmetatable({}, { __mode = "k" })
local Pkcs10Csr = {}
local csrb_methods = {}
local CsrBuilder_mt = { __metatable = "Pkcs10CsrBuilder", __index = csrb_methods }
local Csr_mt = { __metatable = "Pkcs10Csr", __index = {
  to_der = function(c) return CSRS[c] end,
} }
function Pkcs10Csr.builder()
  local b = setmetatable({}, CsrBuilder_mt)
  CSRS[b] = { exts = {}, attrs = {}, hash = "SHA256" }
  return b
end
local function builder_of(b, what)
  local st = CSRS[b]
  if st == nil or getmetatable(b) ~= "Pkcs10CsrBuilder" then error("Pkcs10Csr:" .. what .. ": not a builder", 3) end
  return st
end
function csrb_methods.with_subject(b, n)
  if NAMES[n] == nil then error("Pkcs10Csr:with_subject: expected an X509Name", 2) end
  builder_of(b, "with_subject").name = NAMES[n]
  return b
end
function csrb_methods.with_signer_sobject(b, so)
  builder_of(b, "with_signer_sobject").signer = so
  return b
end
function csrb_methods.with_hash_alg(b, h)
  if type(h) ~= "string" then error("Pkcs10Csr:with_hash_alg: expected a name", 2) end
  builder_of(b, "with_hash_alg").hash = h
  return b
end
function csrb_methods.add_extension(b, oid, critical, der)
  local st = builder_of(b, "add_extension")
  if #st.exts >= 64 then error("Pkcs10Csr:add_extension: at most 64", 2) end
  st.exts[#st.exts + 1] = { oid_of(oid, "Pkcs10Csr:add_extension", 2), critical and true or false,
    new_blob(bytes_of(der, "Pkcs10Csr:add_extension", 2)) }
  return b
end
function csrb_methods.append_attribute(b, oid, der)
  local st = builder_of(b, "append_attribute")
  local o = oid_of(oid, "Pkcs10Csr:append_attribute", 2)
  for _, a in ipairs(st.attrs) do
    if a[1] == o then
      if #a[2] >= 64 then error("Pkcs10Csr:append_attribute: at most 64 values", 2) end
      a[2][#a[2] + 1] = new_blob(bytes_of(der, "Pkcs10Csr:append_attribute", 2))
      return b
    end
  end
  if #st.attrs >= 64 then error("Pkcs10Csr:append_attribute: at most 64", 2) end
  st.attrs[#st.attrs + 1] = { o, { new_blob(bytes_of(der, "Pkcs10Csr:append_attribute", 2)) } }
  return b
end
function csrb_methods.build(b)
  local st = builder_of(b, "build")
  if st.name == nil then error("Pkcs10Csr:build: no subject (with_subject)", 2) end
  local so = st.signer
  if type(so) == "string" then so = { name = so } end
  if type(so) ~= "table" then error("Pkcs10Csr:build: no signer (with_signer_sobject)", 2) end
  local key, e = call("POST", "/crypto/v1/keys/info", nil, SOBJECTS[so] and descriptor(so) or so, true)
  if key == nil then error(e, 2) end
  if BYTES[key.pub_key] == nil then error("Pkcs10Csr:build: the signer has no public key", 2) end
  local ok, packed = pcall(mp_encode, { name = st.name, spki = key.pub_key, exts = st.exts,
    attrs = st.attrs }, MAX_CALL, "request too large")
  if not ok then error(packed, 2) end
  local info = pycall_or_raise(2, "csr_info", packed)
  local sig, e2 = sobject_methods.sign(key, { data = new_blob(info), hash_alg = st.hash })
  if sig == nil then error(e2, 2) end
  local der = pycall_or_raise(2, "csr_final", info, tostring(key.obj_type) .. ":" .. st.hash,
    BYTES[sig.signature])
  local c = setmetatable({}, Csr_mt)
  CSRS[c] = der
  return c
end

local AuditLog = {}
-- Each entry becomes an audit record in the daemon: without a cap one invocation
-- wrote tens of thousands of 4 KiB records (hundreds of MB) before its deadline.
-- The daemon enforces the same cap (pool.MAX_LOGS); this gives a clean error.
local MAX_LOGS, MAX_LOG_BYTES, logs = 100, 4096, 0
function AuditLog.log(t)
  if type(t) ~= "table" or type(t.message) ~= "string" then
    error("AuditLog.log: expected {message=, severity=}", 2)
  end
  local sev = t.severity or "INFO"
  if sev ~= "INFO" and sev ~= "WARNING" and sev ~= "ERROR" and sev ~= "CRITICAL" then
    error("AuditLog.log: severity must be INFO, WARNING, ERROR or CRITICAL", 2)
  end
  if logs >= MAX_LOGS then
    error(s_format("AuditLog.log: at most %d entries per invocation", MAX_LOGS), 2)
  end
  logs = logs + 1
  local _, err = pycall("log", s_sub(t.message, 1, MAX_LOG_BYTES), sev)
  if err then error(err, 2) end
end

------------------------------------------------------------------------------
-- principal(), this_plugin()
local principal_methods = {}
-- Locked like Blob/Error/Time: getmetatable(principal()) gives a name, not the table.
local principal_mt = { __index = principal_methods, __metatable = "principal" }
local function copy_list(l)
  local c = {}
  if type(l) == "table" then for i = 1, #l do c[i] = l[i] end end
  return c
end
local function principal()
  local p = ctx.principal or {}
  local r = setmetatable({ kind = p.kind, id = p.id, name = p.name, groups = copy_list(p.groups) },
    principal_mt)
  PRINCIPALS[r] = true
  return r
end
local function this_plugin()
  local p = ctx.this_plugin or {}
  return { id = p.id, name = p.name, groups = copy_list(p.groups) }
end

-- `principal():id()` and `principal().id` both give the id: a string field
-- that answers a call with the principal as its only argument. Calling any
-- other string fails exactly as before.
local string_mt = getmetatable("")
string_mt.__call = function(s, self)
  if PRINCIPALS[self] then return s end
  error("attempt to call a string value", 2)
end
string_mt.__metatable = "string"
string.dump = nil

------------------------------------------------------------------------------
-- bit32 (Lua 5.2) on top of 5.3 operators
local bit32 = {}
do
  local M = 0xffffffff
  local function n(x) return m_floor(x) & M end
  function bit32.band(...)
    local r = M
    for i = 1, select("#", ...) do r = r & n((select(i, ...))) end
    return r
  end
  function bit32.bor(...)
    local r = 0
    for i = 1, select("#", ...) do r = r | n((select(i, ...))) end
    return r
  end
  function bit32.bxor(...)
    local r = 0
    for i = 1, select("#", ...) do r = r ~ n((select(i, ...))) end
    return r
  end
  function bit32.btest(...) return bit32.band(...) ~= 0 end
  function bit32.bnot(x) return ~n(x) & M end
  function bit32.lshift(x, d)
    if d <= -32 or d >= 32 then return 0 end
    if d < 0 then return n(x) >> -d end
    return (n(x) << d) & M
  end
  function bit32.rshift(x, d) return bit32.lshift(x, -d) end
  function bit32.arshift(x, d)
    x = n(x)
    if d <= 0 then return bit32.lshift(x, -d) end
    if x & 0x80000000 == 0 then return bit32.rshift(x, d) end
    if d >= 32 then return M end
    return ((x >> d) | ~(M >> d)) & M
  end
  function bit32.lrotate(x, d)
    x, d = n(x), m_floor(d) % 32
    return ((x << d) | (x >> (32 - d))) & M
  end
  function bit32.rrotate(x, d) return bit32.lrotate(x, -d) end
  function bit32.extract(x, f, w)
    w = w or 1
    if f < 0 or w <= 0 or f + w > 32 then error("bit32.extract: bad field", 2) end
    return (n(x) >> f) & ((1 << w) - 1)
  end
  function bit32.replace(x, v, f, w)
    w = w or 1
    if f < 0 or w <= 0 or f + w > 32 then error("bit32.replace: bad field", 2) end
    local mask = ((1 << w) - 1) << f
    return (n(x) & ~mask) | ((n(v) << f) & mask)
  end
end

------------------------------------------------------------------------------
-- The plugin's environment: a whitelist.
local function copy(t)
  local c = {}
  for k, v in next, t do c[k] = v end
  return c
end

-- pcall/xpcall/resume cannot swallow a blown budget or an exhausted memory cap.
local function rethrow(ok, ...)
  if exceeded then error("instruction budget exceeded (time_limit)", 0) end
  if not ok then
    local e = ...
    if mem_exceeded or is_mem_error(e) then
      mem_exceeded = true
      error(MEM_MSG, 0)
    end
  end
  return ok, ...
end

local env = {}
local function plugin_print(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  local line = t_concat(parts, "\t") .. "\n"
  if out_cut then return end
  if out_len + #line > out_cap then
    line = s_sub(line, 1, out_cap - out_len)
    out_cut = true
  end
  out_n = out_n + 1
  out[out_n] = line
  out_len = out_len + #line
end

local coro = copy(coroutine)
function coro.create(f)
  local co = co_create(f)
  sethook(co, hook, "", HOOK_EVERY)
  return co
end
function coro.wrap(f)
  if type(f) ~= "function" then error("bad argument #1 to 'wrap' (function expected)", 2) end
  return co_wrap(function(...)
    sethook(hook, "", HOOK_EVERY)
    return f(...)
  end)
end
function coro.resume(co, ...) return rethrow(co_resume(co, ...)) end

local safe_os = { time = os.time, clock = os.clock, date = os.date }
local math_ = copy(math)
local table_ = copy(table)

-- C loops whose length is not bounded by memory (see charge()).
-- string.rep of an empty string allocates nothing and loops n times.
string.rep = function(s, n, sep)
  if s == "" and (sep == nil or sep == "") and type(n) == "number" and n > 0 then n = 0 end
  return s_rep(s, n, sep)
end
-- table.move copies e - f + 1 slots, nils included.
-- (m_toint: the C functions take 1e12 and "12" as integers too.)
table_.move = function(a1, f, e, t, a2)
  local i, j = m_toint(f), m_toint(e)
  if i and j and j >= i then charge(j - i + 1) end
  return t_move(a1, f, e, t, a2)
end
-- insert/remove shift up to #t slots, and #t may come from a __len metamethod.
table_.insert = function(t, ...)
  if select("#", ...) == 2 and type(t) == "table" then
    local pos, n = m_toint((...)), m_toint(#t)
    if pos and n and pos <= n then charge(n - pos + 1) end
  end
  return t_insert(t, ...)
end
table_.remove = function(t, pos)
  if pos ~= nil and type(t) == "table" then
    local i, n = m_toint(pos), m_toint(#t)
    if i and n and i < n then charge(n - i) end
  end
  if pos == nil then return t_remove(t) end
  return t_remove(t, pos)
end
local utf8_ = copy(utf8)

for _, k in ipairs({
  "assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "rawlen", "rawset",
  "select", "tonumber", "tostring", "type", "getmetatable", "_VERSION",
}) do
  env[k] = _ENV[k]
end
env.pcall = function(f, ...) return rethrow(pcall(f, ...)) end
-- A hook error leaves hooks off while the message handler runs: once over
-- budget, the plugin's handler is not called at all.
env.xpcall = function(f, h, ...)
  return rethrow(xpcall(f, function(e)
    if exceeded then return e end
    return h(e)
  end, ...))
end
env.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not allowed", 2)
  end
  return setmetatable(t, mt)
end
env.collectgarbage = function(opt)
  if opt == "count" then return collectgarbage("count") end
  error("collectgarbage: only \"count\" is allowed", 2)
end
env.load = function(chunk, name, mode, e)
  if type(chunk) ~= "string" then error("load: only text chunks (strings) are allowed", 2) end
  if mode ~= nil and mode ~= "t" then error("load: only mode \"t\" is allowed", 2) end
  if e == nil then e = env end
  return load(chunk, name or "=(load)", "t", e)
end
env.print = plugin_print
env.unpack = t_unpack
env.coroutine = coro
env.string = string
env.math = math_
env.table = table_
env.utf8 = utf8_
env.os = safe_os
env.bit32 = bit32
env._G = env
env.null = null
env.Blob = Blob
env.Error = Error
env.Time = Time
env.json = json
env.cbor = cbor
env.Sobject = Sobject
env.digest = digest
env.BigNum = BigNum
env.EcGroup = EcGroup
env.EcPoint = EcPoint
env.Oid = Oid
env.X509Name = X509Name
env.DerEncoder = DerEncoder
env.IpAddr = IpAddr
env.Pkcs10Csr = Pkcs10Csr
env.AuditLog = AuditLog
env.principal = principal
env.this_plugin = this_plugin

------------------------------------------------------------------------------
-- Issue 11, DSM parity (rekey, Group, AuditLog.get_all, certificates, BIP32,
-- TR-31). Every key computation here is a daemon route: the worker sends the
-- request and gets the answer; no key value is computed in Lua or the worker.
-- (One function, after `env`: the main chunk is at Lua's limit of 200 locals.)
;(function()

-- key:rekey{...}: DSM's rotation. The new version keeps the key's name (the
-- daemon renames the old one and links the two); obj_type may be given but
-- must be the key's own.
function sobject_methods.rekey(self, t)
  if t ~= nil and type(t) ~= "table" then
    return nil, new_error(400, "Sobject:rekey: expected a table of fields", "invalid_field")
  end
  local name = type(self) == "table" and rawget(self, "name") or nil
  local obj_type = type(self) == "table" and rawget(self, "obj_type") or nil
  if type(name) ~= "string" or type(obj_type) ~= "string" then
    local info, e = call("POST", "/crypto/v1/keys/info", nil, descriptor(self))
    if info == nil then return nil, e end
    name, obj_type = info.name, info.obj_type
  end
  local b = {}
  if t ~= nil then for k, v in pairs(t) do b[k] = v end end
  if b.name ~= nil and b.name ~= name then
    return nil, new_error(400, "Sobject:rekey: the new version takes the key's own name ("
      .. tostring(name) .. "); rename it with :update{name=} afterwards", "invalid_field")
  end
  if b.obj_type ~= nil and b.obj_type ~= obj_type then
    return nil, new_error(400, "Sobject:rekey: obj_type must stay " .. tostring(obj_type), "invalid_field")
  end
  b.obj_type, b.name = nil, name
  return call("POST", "/crypto/v1/keys/rekey", b, nil, true)
end

-- Group{id=} / Group{group_id=} / Group{name=}: a group the plugin is in (any
-- other answers 404, as a missing one).
local Group = {}
local function group_by_id(id)
  if type(id) ~= "string" or #id == 0 or #id > 256 or s_find(id, "[/?#%%]") then
    return nil, new_error(404, "no group " .. tostring(id), "not_found")
  end
  return api("GET", "/sys/v1/groups/" .. id, nil)
end
function Group.get_all() return api("GET", "/sys/v1/groups", nil) end
setmetatable(Group, {
  __metatable = "Group",
  __call = function(_, t)
    if type(t) ~= "table" then return nil, new_error(400, "Group: expected {id=} or {name=}", "invalid_field") end
    local id = t.id or t.group_id
    if id ~= nil then return group_by_id(id) end
    if type(t.name) ~= "string" then
      return nil, new_error(400, "Group: expected {id=} or {name=}", "invalid_field")
    end
    local all, e = api("GET", "/sys/v1/groups", nil)
    if all == nil then return nil, e end
    for i = 1, #all do
      if all[i].name == t.name then return all[i] end
    end
    return nil, new_error(404, "no group named " .. t.name, "not_found")
  end,
})

-- AuditLog.get_all{object_id=, actor_id=, invocation_id=, limit=, offset=}:
-- DSM's search answer, {hits = {{_id=, _source={...}}, ...}, total=}. The daemon
-- gives a plugin only the records of its own invocations unless an admin set
-- the plugin's audit_read.
local AUDIT_QUERY = { "object_id", "actor_id", "invocation_id", "limit", "offset" }
local function action_type(action)
  if type(action) ~= "string" then return "Other" end
  if s_find(action, "^plugin%.") then return "CustomMessage" end
  if s_find(action, "/session/") then return "Authentication" end
  if s_find(action, "^POST /crypto/v1/") and not s_find(action, "^POST /crypto/v1/keys") then
    return "CryptoOperation"
  end
  if s_find(action, "^GET ") then return "Read" end
  return "Administrative"
end
function AuditLog.get_all(t)
  if t ~= nil and type(t) ~= "table" then error("AuditLog.get_all: expected a table of filters", 2) end
  local q = {}
  for _, k in ipairs(AUDIT_QUERY) do
    if t ~= nil then q[k] = t[k] end
  end
  local r, e = api("GET", "/sys/v1/logs", q)
  if r == nil then return nil, e end
  local hits = {}
  for i = 1, #r do
    local rec = r[i]
    local src = {}
    for k, v in pairs(rec) do src[k] = v end
    src.message = rec.action
    src.action_type = action_type(rec.action)
    src.actor_type = rec.actor_kind
    if type(rec.detail) == "table" and type(rec.detail.message) == "string" then
      src.message, src.severity = rec.detail.message, rec.detail.severity
    end
    hits[i] = { _id = tostring(rec.seq), _source = src }
  end
  return { hits = hits, total = #hits }
end

-- X.509 certificates: Pkcs10Csr.new(subject_key, name), csr:sign(issuer_cert,
-- issuer_key, lifetime, hash) and TbsCertificate. The TBSCertificate is DER
-- built in the worker from public data (asn1crypto); the issuer key signs it
-- in the daemon (Sobject:sign); the result is a transient CERTIFICATE Sobject.
local CERT_MAX_LIFETIME = 100 * 366 * 86400
local function key_info(k, what, level)
  local d = k
  if type(k) == "string" then d = { name = k } elseif SOBJECTS[k] then d = descriptor(k) end
  if type(d) ~= "table" then error(what .. ": expected a key name or an Sobject", level + 1) end
  local info, e = call("POST", "/crypto/v1/keys/info", nil, d, true)
  if info == nil then error(e, level + 1) end
  return info
end
local function cert_der(cert, what, level)
  if type(cert) == "string" then cert = { name = cert } end
  if type(cert) ~= "table" then error(what .. ": expected the issuer certificate (an Sobject)", level + 1) end
  local v = rawget(cert, "value")
  if BYTES[v] ~= nil then return BYTES[v] end
  local full, e = call("POST", "/crypto/v1/keys/export", nil, descriptor(cert) or cert, true)
  if full == nil then
    error(what .. ": cannot read the issuer certificate (give it EXPORT): " .. tostring(e), level + 1)
  end
  return BYTES[full.value]
end
local function lifetime_of(secs, what, level)
  secs = m_toint(secs)
  if secs == nil or secs <= 0 or secs > CERT_MAX_LIFETIME then
    error(what .. ": the lifetime is a number of seconds from 1 to " .. CERT_MAX_LIFETIME, level + 1)
  end
  return secs
end
-- Sign a TBSCertificate spec with the issuer key; a transient CERTIFICATE Sobject.
local function issue(spec, issuer_key, hash, what, level)
  local key = key_info(issuer_key, what, level + 1)
  if hash == nil or rawequal(hash, null) then hash = "SHA256" end
  if type(hash) ~= "string" then error(what .. ": the hash is a name such as SHA256", level + 1) end
  spec.alg = tostring(key.obj_type) .. ":" .. hash
  local ok, packed = pcall(mp_encode, spec, MAX_CALL, "certificate too large")
  if not ok then error(packed, level + 1) end
  local tbs = pycall_or_raise(level + 1, "tbs", packed)
  local sig, e = sobject_methods.sign(key, { data = new_blob(tbs), hash_alg = hash })
  if sig == nil then error(e, level + 1) end
  local der = pycall_or_raise(level + 1, "cert_final", tbs, spec.alg, BYTES[sig.signature])
  local cert, e2 = call("PUT", "/crypto/v1/keys", { obj_type = "CERTIFICATE", value = new_blob(der),
    transient = true, key_ops = { "VERIFY", "EXPORT" } }, nil, true)
  if cert == nil then error(e2, level + 1) end
  return cert
end

function Pkcs10Csr.new(subject_key, name)
  if NAMES[name] == nil then error("Pkcs10Csr.new: expected an X509Name", 2) end
  local b = Pkcs10Csr.builder()
  csrb_methods.with_subject(b, name)
  csrb_methods.with_signer_sobject(b, SOBJECTS[subject_key] and descriptor(subject_key) or subject_key)
  return csrb_methods.build(b)
end
function Pkcs10Csr.from_der(der)
  local s = bytes_of(der, "Pkcs10Csr.from_der", 2)
  if #s > MAX_CALL then error("Pkcs10Csr.from_der: too large", 2) end
  local c = setmetatable({}, Csr_mt)
  CSRS[c] = pycall_or_raise(2, "csr_check", s)
  return c
end
-- csr:sign(issuer_cert, issuer_key, lifetime_seconds, hash): the certificate
-- (subject, public key and requested extensions from the request, whose own
-- signature is checked first).
local csr_index = {}
function csr_index.to_der(c) return CSRS[c] end
function csr_index.sign(c, issuer_cert, issuer_key, lifetime, hash)
  local der = CSRS[c]
  if type(der) ~= "string" then error("Pkcs10Csr:sign: not a certificate request", 2) end
  local spec = { csr = new_blob(der), issuer_cert = new_blob(cert_der(issuer_cert, "Pkcs10Csr:sign", 2)),
    lifetime = lifetime_of(lifetime, "Pkcs10Csr:sign", 2), serial_bits = 128 }
  return issue(spec, issuer_key, hash, "Pkcs10Csr:sign", 2)
end
Csr_mt.__index = csr_index

local TBS = setmetatable({}, { __mode = "k" })
local TbsCertificate = {}
local tbs_methods = {}
local Tbs_mt = { __metatable = "TbsCertificate", __index = tbs_methods }
-- TbsCertificate.new(subject_key, name, subject_key_id, lifetime_seconds)
function TbsCertificate.new(subject_key, name, skid, lifetime)
  if NAMES[name] == nil then error("TbsCertificate.new: expected an X509Name", 2) end
  local key = key_info(subject_key, "TbsCertificate.new", 2)
  if BYTES[key.pub_key] == nil then error("TbsCertificate.new: the subject key has no public key", 2) end
  local id = nil
  if skid ~= nil and not rawequal(skid, null) then
    id = BYTES[skid]
    if id == nil and type(skid) == "string" then id = pycall_or_raise(2, "b64d", skid) end
    if type(id) ~= "string" or #id == 0 or #id > 64 then
      error("TbsCertificate.new: the subject key identifier is 1 to 64 bytes (a Blob or base64)", 2)
    end
  end
  local t = setmetatable({}, Tbs_mt)
  TBS[t] = { name = NAMES[name], spki = key.pub_key, skid = id and new_blob(id) or nil,
    lifetime = lifetime_of(lifetime, "TbsCertificate.new", 2), exts = {} }
  return t
end
function tbs_methods.add_extension(t, oid, critical, der)
  local st = TBS[t]
  if st == nil then error("TbsCertificate:add_extension: not a TbsCertificate", 2) end
  if #st.exts >= 64 then error("TbsCertificate:add_extension: at most 64", 2) end
  local v = bytes_of(der, "TbsCertificate:add_extension", 2)
  st.size = (st.size or 0) + #v
  if st.size > DER_MAX_BYTES then
    error("TbsCertificate:add_extension: too large (" .. DER_MAX_BYTES .. " bytes in all)", 2)
  end
  st.exts[#st.exts + 1] = { oid_of(oid, "TbsCertificate:add_extension", 2), critical and true or false,
    new_blob(v) }
  return t
end
-- tbs:sign(issuer_cert, issuer_key, serial_number_bits, hash)
function tbs_methods.sign(t, issuer_cert, issuer_key, serial_bits, hash)
  local st = TBS[t]
  if st == nil then error("TbsCertificate:sign: not a TbsCertificate", 2) end
  if rawequal(serial_bits, null) then serial_bits = nil end
  serial_bits = m_toint(serial_bits or 128)
  if serial_bits == nil or serial_bits < 32 or serial_bits > 160 then
    error("TbsCertificate:sign: serial_number_bits is 32 to 160", 2)
  end
  local spec = { name = st.name, spki = st.spki, skid = st.skid, exts = st.exts,
    issuer_cert = new_blob(cert_der(issuer_cert, "TbsCertificate:sign", 2)), lifetime = st.lifetime,
    serial_bits = serial_bits }
  return issue(spec, issuer_key, hash, "TbsCertificate:sign", 2)
end

-- BIP32 (DSM's native forms): seed:derive{key_type="BIP32", mechanism=
-- {bip32_master_key={network=}}}, key:derive{mechanism={bip32_hardened_child=
-- {index=}}}, key:transform{mechanism={bip32_weak_child={index=}}}. Computed by
-- the daemon, only from keys whose key_ops include EXPORT.
function sobject_methods.derive(self, t)
  return call("POST", "/crypto/v1/derive", t, { key = descriptor(self) }, true)
end
function sobject_methods.transform(self, t)
  return call("POST", "/crypto/v1/keys/transform", t, { key = descriptor(self) }, true)
end
-- A BIP32 key is imported from its serialization (xprv... text, as DSM's text
-- import) and exported as that text.
local plain_import, plain_export = Sobject.import, sobject_methods.export
function Sobject.import(t)
  if type(t) == "table" and t.obj_type == "BIP32" then
    return call("POST", "/crypto/v1/keys/bip32/import", t, nil, true)
  end
  return plain_import(t)
end
local function is_bip32(so)
  if type(so) ~= "table" then return false end
  local md = rawget(so, "custom_metadata")
  return rawget(so, "obj_type") == "BIP32" or (type(md) == "table" and md.bip32_xpub ~= nil)
end
function sobject_methods.export(self)
  if is_bip32(self) then
    return call("POST", "/crypto/v1/keys/bip32/export", nil, { key = descriptor(self) }, true)
  end
  return plain_export(self)
end

-- TR-31 key blocks (ANSI X9.143), opened and sealed by the daemon (psec) with a
-- key block protection key whose key_ops include EXPORT.
local function tr31_open(kbpk, block)
  if type(block) ~= "string" or #block > 65536 then
    return nil, new_error(400, "tr31_open: the key block is a string (at most 65536 characters)", "invalid_field")
  end
  local r, e = api("POST", "/crypto/v1/keys/tr31/open", { key = descriptor(kbpk), key_block = block })
  if r == nil then return nil, e end
  return r.key
end
local TR31_FIELDS = { "version", "key_usage", "algorithm", "mode_of_use", "key_version_number",
  "exportability", "key_context" }
local TR31 = setmetatable({}, { __mode = "k" })
local Tr31Envelope = {}
local Tr31_mt = { __metatable = "Tr31Envelope", __index = {} }
function Tr31Envelope.new(...)
  local h = {}
  for i, k in ipairs(TR31_FIELDS) do
    local v = (select(i, ...))
    if v ~= nil and (type(v) ~= "string" or #v > 256) then
      error("Tr31Envelope.new: " .. k .. " must be a string", 2)
    end
    h[k] = v
  end
  local e = setmetatable({}, Tr31_mt)
  TR31[e] = h
  return e
end
function Tr31_mt.__index.seal(env_, kbpk, target)
  local h = TR31[env_]
  if h == nil then error("Tr31Envelope:seal: not a Tr31Envelope", 2) end
  local r, e = api("POST", "/crypto/v1/keys/tr31/seal", { key = descriptor(kbpk), subject = descriptor(target),
    header = h })
  if r == nil then return nil, e end
  return r.key_block
end

env.Group, env.TbsCertificate, env.Tr31Envelope, env.tr31_open = Group, TbsCertificate, Tr31Envelope,
  tr31_open
end)()

------------------------------------------------------------------------------
-- request{method=, url=, headers=, body=}: DSM's outbound HTTP call. The daemon
-- makes it (strongroomd/outbound.py), only to the origins an admin put in this
-- plugin's request_allowlist; the worker itself has no network (seccomp). The
-- answer is {status=, headers=, body=} (lower-case header names, body a Blob),
-- or nil and an Error: 400 bad arguments, 403 not allowed, 413 body too large,
-- 429 too many requests, 502 the remote end failed, 503 audit log failing,
-- 504 no answer in time.
;(function()
local MAX_BODY = 2 * 1024 * 1024
local MAX_HEADERS = 64

local function request(t)
  if type(t) ~= "table" then error("request: expected a table {method=, url=, headers=, body=}", 2) end
  local method, url, headers, body = t.method, t.url, t.headers, t.body
  if method == nil then method = "GET" end
  if type(method) ~= "string" then error("request: method must be a string", 2) end
  if type(url) ~= "string" then error("request: url must be a string", 2) end
  local h = {}
  if headers ~= nil then
    if type(headers) ~= "table" then error("request: headers must be a table", 2) end
    local n = 0
    for k, v in pairs(headers) do
      n = n + 1
      if n > MAX_HEADERS then error(s_format("request: at most %d headers", MAX_HEADERS), 2) end
      if type(k) ~= "string" then error("request: a header name must be a string", 2) end
      if type(v) ~= "string" and type(v) ~= "number" then
        error(s_format("request: header %s must be a string", k), 2)
      end
      h[k] = v
    end
  end
  if BYTES[body] ~= nil then body = BYTES[body] end
  if body ~= nil and type(body) ~= "string" then
    error("request: body must be a string or a Blob", 2)
  end
  if body ~= nil and #body > MAX_BODY then
    return nil, new_error(413, s_format("request: the body is over %d bytes", MAX_BODY), "too_large")
  end
  local ok, frame = pcall(mp_encode, { t = "http", method = method, url = url, headers = h,
    body = body }, MAX_CALL, "request too large")
  if not ok then return nil, new_error(413, tostring(frame), "too_large") end
  local reply, err = pycall("call", frame)
  if reply == nil then return nil, new_error(500, err, "internal") end
  local ok2, r = pcall(mp_decode, reply)
  if not ok2 or type(r) ~= "table" then return nil, new_error(500, "bad reply", "internal") end
  local status, rbody = r.status, r.body
  if status ~= 200 or type(rbody) ~= "table" then
    local msg, code = "request failed", "internal"
    if type(rbody) == "table" then
      if type(rbody.message) == "string" then msg = rbody.message end
      if type(rbody.error) == "string" then code = rbody.error end
    end
    return nil, new_error(m_type(status) == "integer" and status or 500, msg, code)
  end
  local rh = {}
  if type(rbody.headers) == "table" then
    for k, v in next, rbody.headers do rh[k] = v end
  end
  local data = rbody.body  -- bin: decoded as a Blob already
  if BYTES[data] == nil then data = new_blob(type(data) == "string" and data or "") end
  return { status = rbody.status, headers = rh, body = data }
end

env.request = request
end)()

------------------------------------------------------------------------------
-- One invocation.

local function error_of(v)
  if ERRORS[v] then return v end
  if type(v) == "string" then return new_error(400, v) end
  if v ~= nil and not rawequal(v, null) then return new_error(400, "plugin error") end
  return nil
end

-- What a check/run return list means: nil (go on / 204), or an Error.
local function failure(r)
  if ERRORS[r[1]] then return r[1] end
  if r.n >= 2 and ERRORS[r[2]] then return r[2] end
  if r[1] == nil and r.n >= 2 then return error_of(r[2]) end
  return nil
end

local function clean_traceback(tb)
  local lines, n = {}, 0
  for line in s_gmatch(tb, "[^\n]+") do
    if not s_find(line, "^%s*%?:") and not s_find(line, "^%s*%[C%]: in %?$")
      and not s_find(line, "^%s*%(%.%.%.tail calls%.%.%.%)$") then
      n = n + 1
      lines[n] = line
    end
  end
  return t_concat(lines, "\n")
end

local function safe_message(m)
  if type(m) == "string" then return m end
  if type(m) == "number" then return tostring(m) end
  return ""
end

-- A message goes into the traceback and the done frame: megabytes of it only
-- exhausted the memory cap here or made the frame too large for the daemon.
local MAX_MESSAGE = 4096
local function message_of(e)
  local te = type(e)
  if te == "string" then
    if #e > MAX_MESSAGE then return s_sub(e, 1, MAX_MESSAGE) .. " [truncated]" end
    return e
  end
  if te == "number" then return tostring(e) end
  if ERRORS[e] then return message_of(safe_message(rawget(e, "message"))) end
  return "(error object is a " .. te .. " value)"
end

local function output()
  local s = t_concat(out)
  if out_cut then s = s .. "\n[output truncated]\n" end
  return s
end

-- Returns kind, body, status, message, traceback, instructions, memory peak (KiB), output.
--   "ok":      body = msgpack of the result, or nil (204)
--   "error":   status, message (an Error: returned, or raised), traceback when raised
--   "runtime": message, traceback (an uncaught error)
--   "time" | "memory" | "too_large" | "syntax": message
return function(code, chunkname, binary, args, budget_, max_output, max_result)
  budget, out_cap = budget_, max_output
  local fn, err = load(code, chunkname, binary and "b" or "t", env)
  if not fn then return "syntax", nil, 400, err, nil, 0, 0, "" end
  local a = mp_decode(args)
  local input, url, method = a[1], a[2], a[3]
  ctx = a[4]
  if type(url) == "table" and rawequal(url.query, null) then url.query = nil end

  local co = co_create(function()
    fn()
    local check = env.check
    if check ~= nil then
      local e = failure(t_pack(check(input, url, method)))
      if e then return "error", e end
    end
    local run = env.run
    if run == nil then error("the plugin does not define run(input, url, method)", 0) end
    local r = t_pack(run(input, url, method))
    local e = failure(r)
    if e then return "error", e end
    if r[1] == nil then return "ok", nil end
    return "ok", mp_encode(r[1], max_result, TOO_LARGE)
  end)
  sethook(co, hook, "", HOOK_EVERY)
  local ok, kind, val = co_resume(co)
  sethook(co)
  local kb = collectgarbage("count")
  if kb > mem_peak then mem_peak = kb end
  local n, peak = count, mem_peak
  if exceeded then
    return "time", nil, 504, "the plugin exceeded its instruction budget", nil, n, peak, output()
  end
  if ok then
    if co_status(co) ~= "dead" then
      return "runtime", nil, 500, "attempt to yield from outside a coroutine", nil, n, peak,
        output()
    end
    if kind == "error" then
      return "error", nil, rawget(val, "status"), message_of(val), nil, n, peak, output()
    end
    return "ok", val, val and 200 or 204, nil, nil, n, peak, output()
  end
  local e = kind
  if mem_exceeded or is_mem_error(e) then
    return "memory", nil, 413, "the plugin exceeded its memory limit", nil, n, peak, output()
  end
  if rawequal(e, TOO_LARGE) then
    return "too_large", nil, 413, "the result is larger than " .. max_result .. " bytes", nil, n,
      peak, output()
  end
  local msg = message_of(e)
  local tb = clean_traceback(traceback(co, msg))
  if ERRORS[e] then
    return "error", nil, rawget(e, "status"), msg, tb, n, peak, output()
  end
  return "runtime", nil, 500, msg, tb, n, peak, output()
end
