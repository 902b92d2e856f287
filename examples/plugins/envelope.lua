-- Envelope encryption with a transient data key.
--
-- encrypt: {op="encrypt", plain=<bytes>}           -> {cipher, iv, tag, wrapped_key}
-- decrypt: {op="decrypt", cipher, iv, tag, wrapped_key} -> {plain}
--
-- A fresh AES-256 data key is made for every message inside the token; it
-- never leaves the daemon except wrapped (AES-KWP) under the stored key
-- "envelope-kek", and it vanishes when the invocation ends.

local KEK = "envelope-kek"

function check(input)
  if input.op ~= "encrypt" and input.op ~= "decrypt" then
    return nil, Error.new{status = 400, message = "op must be encrypt or decrypt"}
  end
end

local function encrypt(kek, input)
  local dek = assert(Sobject.create{
    obj_type = "AES", key_size = 256, transient = true,
    key_ops = {"ENCRYPT", "DECRYPT", "EXPORT"},
  })
  local enc = assert(dek:encrypt{alg = "AES", mode = "GCM", plain = input.plain})
  local wrapped = assert(kek:wrap{subject = dek, alg = "AES", mode = "KWP"})
  return {cipher = enc.cipher, iv = enc.iv, tag = enc.tag, wrapped_key = wrapped.wrapped_key}
end

local function decrypt(kek, input)
  local dek = assert(kek:unwrap{
    alg = "AES", mode = "KWP", obj_type = "AES", wrapped_key = input.wrapped_key,
    transient = true, key_ops = {"DECRYPT"},
  })
  local out, err = dek:decrypt{alg = "AES", mode = "GCM", cipher = input.cipher,
                               iv = input.iv, tag = input.tag}
  if not out then
    return nil, err
  end
  return {plain = out.plain}
end

function run(input)
  local kek = assert(Sobject{name = KEK})
  if input.op == "encrypt" then
    return encrypt(kek, input)
  end
  return decrypt(kek, input)
end
