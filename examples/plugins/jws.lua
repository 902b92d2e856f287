-- A JWS (RS256) signer: {claims={...}} -> {jws="<header>.<payload>.<signature>"}
--
-- Signs with the RSA key "jws-rs256" (PKCS#1 v1.5, SHA-256), the compact
-- serialization of RFC 7515. The key id in the header is the key's kid.

local KEY = "jws-rs256"

local function b64url(blob)
  return (blob:base64_urlsafe():gsub("=", ""))
end

function check(input)
  if type(input.claims) ~= "table" then
    return nil, Error.new{status = 400, message = "claims must be a map"}
  end
end

function run(input)
  local key = assert(Sobject{name = KEY})
  local header = json.encode({alg = "RS256", typ = "JWT", kid = key.kid})
  local signing_input = b64url(Blob.from_bytes(header)) .. "."
      .. b64url(Blob.from_bytes(json.encode(input.claims)))
  local sig = assert(key:sign{hash_alg = "SHA256", data = Blob.from_bytes(signing_input)})
  return {jws = signing_input .. "." .. b64url(sig.signature)}
end
