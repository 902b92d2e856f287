-- Tokenization of a card number (PAN) with an HMAC key.
--
-- {pan="4111111111111111"} -> {token="<digits>1111"}
--
-- The token keeps the last four digits and replaces the others with digits
-- derived from HMAC-SHA256(pan) under the stored key "tokenize-hmac", so the
-- same PAN always gives the same token and the key never leaves the token.
-- (Digits are taken as byte % 10: a slight bias, fine for tokens, not for keys.)

local KEY = "tokenize-hmac"

function check(input)
  if type(input.pan) ~= "string" or not input.pan:match("^%d+$")
      or #input.pan < 13 or #input.pan > 19 then
    return nil, Error.new{status = 400, message = "pan must be 13 to 19 digits"}
  end
end

function run(input)
  local key = assert(Sobject{name = KEY})
  local mac = assert(key:mac{alg = "SHA256", data = Blob.from_bytes(input.pan)}).mac:bytes()
  local digits = {}
  for i = 1, #input.pan - 4 do
    digits[i] = tostring(mac:byte(i) % 10)
  end
  return {token = table.concat(digits) .. input.pan:sub(-4)}
end
