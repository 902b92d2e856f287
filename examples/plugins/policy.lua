-- A policy plugin: signs only for invokers that are the app named ALLOWED_APP.
--
-- {data=<bytes>} -> {signature=<bytes>} (ECDSA P-256, SHA-256, DER)
--
-- The key "policy-key" is in the plugin's group; apps in that group could
-- sign with it directly only if the key's key_ops let them, so give the
-- key to the plugin's group alone and let this rule decide who signs.

local ALLOWED_APP = "payments-signer"
local KEY = "policy-key"

function check(input)
  local who = principal()
  if who.kind ~= "app" or who.name ~= ALLOWED_APP then
    AuditLog.log{message = "refused a signature for " .. tostring(who.name), severity = "WARNING"}
    return nil, Error.new{status = 403, message = "only " .. ALLOWED_APP .. " may sign"}
  end
end

function run(input)
  local key = assert(Sobject{name = KEY})
  local sig = assert(key:sign{hash_alg = "SHA256", data = input.data})
  return {signature = sig.signature}
end
