"""The PKCS#11 token: the only code in Strongroom that imports ``pkcs11``.

``Token`` is the async face. Requests are checked on the event loop (the
meaning of alg/mode/iv/... is in ``strongroomd.mechanisms``); the PKCS#11
calls run on one dedicated thread (``thread.Worker``) over one logged-in
session, with every object indexed by CKA_ID at start-up (``core.Core``)
and hot session copies of stored keys made on first use. The thread serves
principals round-robin and keeps key-pair generation in a bounded lane of
its own (see ``thread``); calls that may open token files first check for
free descriptors and recover a token a failed call broke (see ``core``).

    >>> token = await Token.open("/usr/lib/softhsm/libsofthsm2.so", "strongroom", pin)
    >>> await token.encrypt(key, {"alg": "AES", "plain": b"..."})
    {"cipher": ..., "iv": ..., "tag": ...}
    >>> await token.close()
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkcs11 import Mechanism
from pkcs11 import exceptions as p11e

from strongroomd import mechanisms as mech
from strongroomd._token import ops, streams
from strongroomd._token.core import Core, token_error
from strongroomd._token.thread import MISSED, Worker
from strongroomd.errors import ApiError, BadRequest, BadTag, Unsupported
from strongroomd.keyref import KeyMaterial, KeyRef, NewKey

__all__ = ["Token"]

_SYMMETRIC = frozenset(("AES", "DES3", "DES"))


def _as_token_cipher(key: KeyRef, req: dict) -> tuple[str, dict]:
    """A DES key is a DES3 object holding K||K||K: its requests are DES3 ones."""
    if key.obj_type != "DES":
        return key.obj_type, req
    return "DES3", ({**req, "alg": "DES3"} if req.get("alg") == "DES" else req)


#: Largest input a symmetric operation may run inline on the event loop.
SHORT = 16 * 1024
_PKCS11Error = p11e.PKCS11Error
# One Token at a time per process: two threads inside the module crash it.
_open_lock = threading.Lock()
# Operations that may write token objects (files, for SoftHSM).
_WRITES = frozenset(
    ("delete", "generate", "import", "rename", "restrict", "persist", "unwrap", "agree", "derive")
)


# Operations that may open token files without writing (reads of token objects).
_FILES = _WRITES | {"export", "wrap"}
# Generated in the slow lane: key pairs (RSA takes seconds; see ``thread``).
_KEY_PAIRS = frozenset(("RSA", "EC"))


def _guarded(fd: int | None, fn: Any, core: Core, *args: Any) -> Any:
    """Run ``fn`` (on the token thread) for a call that may open token files.

    Under a shared flock on ``fd`` when it writes (a backup's exclusive lock
    makes this wait, and with it the token thread); refused when descriptors
    are short, and followed by a health check of the token when it fails
    (``Core.enter`` / ``Core.failed``).
    """
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        core.enter()
        try:
            return fn(core, *args)
        except _PKCS11Error:
            core.failed()
            raise
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _asym_type(key: KeyRef) -> str:
    """RSA or EC for a key or a certificate's public key."""
    if key.obj_type == "CERTIFICATE":
        return "EC" if key.curve else "RSA"
    return key.obj_type


class Token:
    """One logged-in session on one PKCS#11 token, driven from asyncio."""

    def __init__(self, worker: Worker, core: Core, write_lock: int | None = None) -> None:
        self._worker = worker
        self._core = core
        self._call = worker.call
        self._write_lock = write_lock
        #: Whether the caller is idle enough for a short call to run inline on the
        #: event loop; the server wires it to its load. Never, by default.
        self.quiet: Callable[[], bool] = lambda: False

    @classmethod
    async def open(
        cls,
        module: str,
        label: str,
        pin: str,
        write_lock: Path | None = None,
        *,
        slow_per_principal: int = 2,
        slow_total: int = 8,
    ) -> Token:
        """``write_lock``: a file whose shared flock every write to the token holds
        (see ``strongroomd.backup``: a backup takes it exclusively to freeze the token).
        ``slow_per_principal``/``slow_total``: the slow lane's bounds (``thread.Worker``)."""
        if not _open_lock.acquire(blocking=False):
            raise RuntimeError("a Token is already open in this process")
        fd = None
        if write_lock is not None:
            fd = os.open(write_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        worker = Worker(
            asyncio.get_running_loop(),
            slow_per_principal=slow_per_principal,
            slow_total=slow_total,
        )
        worker.start()
        try:
            core = await worker.call(Core, module, label, pin)
        except BaseException:
            await worker.stop()
            if fd is not None:
                os.close(fd)
            _open_lock.release()
            raise
        return cls(worker, core, fd)

    async def close(self) -> None:
        if self._core is None:
            return
        core, self._core = self._core, None

        def close() -> None:
            streams.abort_all(core)
            core.close()

        try:
            await self._worker.stop(close)
        finally:
            if self._write_lock is not None:
                os.close(self._write_lock)
                self._write_lock = None
            _open_lock.release()

    def kids(self) -> set[str]:
        if self._core is None:
            raise RuntimeError("the token is closed")
        return self._core.kids()

    async def _run(self, what: str, fn: Any, *args: Any, slow: bool = False) -> Any:
        call = self._worker.slow if slow else self._call
        try:
            if what in _FILES:
                fd = self._write_lock if what in _WRITES else None
                return await call(_guarded, fd, fn, self._core, *args)
            return await call(fn, self._core, *args)
        except _PKCS11Error as exc:
            raise token_error(exc, what) from None

    # -- management ----------------------------------------------------------

    async def learn(self, kid: str) -> bool:
        """Whether the token holds ``kid``, found by CKA_ID if another node made it."""
        return await self._run("lookup", lambda core, k: core.learn(k) is not None, kid)

    async def forget(self, kid: str) -> None:
        """Another node deleted ``kid``: drop it from the index (not from the token)."""
        await self._run("lookup", Core.forget, kid)

    async def remove(self, kid: str) -> None:
        await self._run("delete", Core.remove, kid)

    async def generate(self, new: NewKey) -> KeyMaterial:
        """Key pairs go to the slow lane (429 ``busy`` when it is full)."""
        return await self._run("generate", Core.generate, new, slow=new.obj_type in _KEY_PAIRS)

    async def import_key(self, new: NewKey, value: bytes) -> KeyMaterial:
        return await self._run("import", Core.import_key, new, value)

    async def export(self, key: KeyRef) -> bytes:
        return await self._run("export", Core.export, key)

    async def rename(self, key: KeyRef, name: str) -> None:
        await self._run("rename", Core.rename, key, name)

    async def kcv(self, key: KeyRef, method: str) -> str:
        """A key check value: the first 3 bytes of the key's encryption of a zero
        block ("Encrypt"), or the first 5 of its CMAC over one ("Cmac", AES)."""
        t = "DES3" if key.obj_type == "DES" else key.obj_type
        if t not in ("AES", "DES3"):
            raise Unsupported("a key check value is for AES, DES and DES3 keys")
        block = bytes(16 if t == "AES" else 8)
        if method == "Cmac":
            if t != "AES":
                raise Unsupported("a CMAC key check value is for AES keys")
            out = await self._run("kcv", ops.sign, key.kid, Mechanism.AES_CMAC, None, block)
            return out[:5].hex().upper()
        m = Mechanism.AES_ECB if t == "AES" else Mechanism.DES3_ECB
        out = await self._run("kcv", ops.encrypt, key.kid, m, None, block)
        return out[:3].hex().upper()

    async def restrict(self, key: KeyRef) -> None:
        """CKA_SENSITIVE on and CKA_EXTRACTABLE off, for good (EXPORT was removed)."""
        await self._run("restrict", Core.restrict, key.kid)

    async def remove_private(self, kid: str) -> bool:
        """Destroy the private half of a key pair (the public one stays)."""
        return await self._run("delete", Core.remove_private, kid)

    def has_private(self, kid: str) -> bool:
        """From the index (no token call)."""
        if self._core is None:
            raise RuntimeError("the token is closed")
        return self._core.has_private(kid)

    async def restrict_many(self, kids: list[str]) -> int:
        """Restrict every listed key the token still holds exportable (start-up)."""
        return await self._run("restrict", Core.restrict_many, kids)

    async def persist(self, key: KeyRef, new: NewKey) -> KeyMaterial:
        return await self._run("persist", Core.persist, key, new)

    # -- crypto --------------------------------------------------------------

    def _short(self, fn: Any, kid: str, m: Any, p: Any, data: bytes) -> Any:
        """A symmetric operation on small data, inline when the token thread is idle.

        Bounded work (one AES/DES3 call on at most SHORT bytes of an already
        hot key) is all that may run on the event loop; anything else queues.
        """
        e = self._core.index.get(kid)
        if len(data) > SHORT or e is None or (e.token and e.hot is None) or not self.quiet():
            return MISSED
        return self._worker.inline(fn, self._core, kid, m, p, data)

    async def encrypt(self, key: KeyRef, req: dict) -> dict:
        t = key.obj_type
        plain = req["plain"]
        if t in _SYMMETRIC:
            t, req = _as_token_cipher(key, req)
            spec = mech.cipher_spec(t, req, decrypt=False)
            m, p = ops.sym_mechanism(spec)
            try:
                out = self._short(ops.encrypt, key.kid, m, p, plain)
                if out is MISSED:
                    out = await self._call(ops.encrypt, self._core, key.kid, m, p, plain)
            except _PKCS11Error as exc:
                raise token_error(exc, "encrypt") from None
            if spec.kind == "AES_GCM":
                cut = len(out) - spec.tag_bits // 8
                return {"cipher": out[:cut], "iv": spec.iv, "tag": out[cut:]}
            if spec.return_iv:
                return {"cipher": out, "iv": spec.iv}
            return {"cipher": out}
        if _asym_type(key) != "RSA" or req.get("alg") != "RSA":
            raise Unsupported(f"alg {req.get('alg')} cannot encrypt with a {t} key")
        if req.get("label"):
            raise Unsupported("an RSA OAEP label is not supported")
        mode = mech.rsa_encrypt_mode(req.get("mode"))
        if mode.kind == "PKCS1_V15":
            m, p, data = Mechanism.RSA_PKCS, None, plain
        elif mode.hash == "SHA1":
            m, p, data = Mechanism.RSA_PKCS_OAEP, ops.OAEP_SHA1, plain
        else:
            m, p = Mechanism.RSA_X_509, None
            data = mech.oaep_encode(plain, key.key_size // 8, mode.hash)
        return {"cipher": await self._run("encrypt", ops.public_encrypt, key.kid, m, p, data)}

    async def symmetric_many(
        self, key: KeyRef, reqs: list[dict], *, decrypting: bool
    ) -> list[dict | ApiError]:
        """A batch's AES/DES3 items for one key as one token job (not one each):
        per item a result, or the error that item alone gets."""
        out: list[dict | ApiError | None] = [None] * len(reqs)
        jobs = []
        for i, req in enumerate(reqs):
            try:
                t, req = _as_token_cipher(key, req)
                spec = mech.cipher_spec(t, req, decrypt=decrypting)
                m, p = ops.sym_mechanism(spec)
                if not decrypting:
                    data = req["plain"]
                elif spec.kind == "AES_GCM":
                    if "tag" not in req:
                        raise BadRequest("GCM decryption needs tag", code="missing_field")
                    data = req["cipher"] + req["tag"]
                else:
                    data = req["cipher"]
                jobs.append((i, spec, m, p, data))
            except ApiError as exc:
                out[i] = exc
        if jobs:
            done = await self._call(
                ops.symmetric_many,
                self._core,
                key.kid,
                decrypting,
                [(m, p, data) for _i, _s, m, p, data in jobs],
            )
            for (i, spec, *_), r in zip(jobs, done, strict=True):
                if isinstance(r, ops.DECRYPT_FAILURES) and decrypting:
                    out[i] = BadTag()
                elif isinstance(r, Exception):
                    out[i] = token_error(r, "decrypt" if decrypting else "encrypt")
                elif decrypting:
                    out[i] = {"plain": r}
                elif spec.kind == "AES_GCM":
                    cut = len(r) - spec.tag_bits // 8
                    out[i] = {"cipher": r[:cut], "iv": spec.iv, "tag": r[cut:]}
                else:
                    out[i] = {"cipher": r, "iv": spec.iv} if spec.return_iv else {"cipher": r}
        return out  # type: ignore[return-value]

    async def decrypt(self, key: KeyRef, req: dict) -> dict:
        t = key.obj_type
        cipher = req["cipher"]
        if t in _SYMMETRIC:
            t, req = _as_token_cipher(key, req)
            spec = mech.cipher_spec(t, req, decrypt=True)
            m, p = ops.sym_mechanism(spec)
            if spec.kind == "AES_GCM":
                cipher += req["tag"]
            try:
                plain = self._short(ops.decrypt, key.kid, m, p, cipher)
                if plain is MISSED:
                    plain = await self._call(ops.decrypt, self._core, key.kid, m, p, cipher)
            except ops.DECRYPT_FAILURES:
                raise BadTag() from None
            except _PKCS11Error as exc:
                raise token_error(exc, "decrypt") from None
            return {"plain": plain}
        if t != "RSA" or req.get("alg") != "RSA":
            raise Unsupported(f"alg {req.get('alg')} cannot decrypt with a {t} key")
        if key.public_only:
            raise Unsupported("a public key cannot decrypt")
        if req.get("label"):
            raise Unsupported("an RSA OAEP label is not supported")
        mode = mech.rsa_encrypt_mode(req.get("mode"))
        k = key.key_size // 8
        if mode.kind == "PKCS1_V15":
            m, p = Mechanism.RSA_PKCS, None
        elif mode.hash == "SHA1":
            m, p = Mechanism.RSA_PKCS_OAEP, ops.OAEP_SHA1
        else:
            m, p = Mechanism.RSA_X_509, None
        if len(cipher) != k:
            raise BadTag()
        try:
            out = await self._call(ops.decrypt, self._core, key.kid, m, p, cipher)
        except ops.DECRYPT_FAILURES:
            raise BadTag() from None
        except _PKCS11Error as exc:
            raise token_error(exc, "decrypt") from None
        if m == Mechanism.RSA_X_509:
            out = mech.oaep_decode(out, k, mode.hash)
        return {"plain": out}

    def _sign_spec(self, key: KeyRef, req: dict) -> tuple[mech.SignSpec, Any, Any, bytes]:
        t = _asym_type(key)
        if t not in ("RSA", "EC"):
            raise Unsupported(f"a {key.obj_type} key cannot sign or verify")
        spec = mech.sign_spec(t, key.curve, req)
        return (spec, *ops.sign_mechanism(spec))

    async def sign(self, key: KeyRef, req: dict) -> dict:
        if key.public_only:
            raise Unsupported("a public key cannot sign")
        spec, m, p, data = self._sign_spec(key, req)
        sig = await self._run("sign", ops.sign, key.kid, m, p, data)
        if spec.kind == "ECDSA":
            sig = mech.ecdsa_raw_to_der(sig)
        return {"signature": sig}

    async def verify(self, key: KeyRef, req: dict) -> dict:
        spec, m, p, data = self._sign_spec(key, req)
        sig = req["signature"]
        if spec.kind == "ECDSA":
            sig = mech.ecdsa_der_to_raw(sig, mech.CURVES[key.curve].size)
            if sig is None:
                return {"result": False}
        ok = await self._run("verify", ops.verify, key.kid, m, p, data, sig)
        return {"result": ok}

    async def mac(self, key: KeyRef, req: dict) -> dict:
        m = ops.mac_mechanism(mech.mac_alg(key.obj_type, req.get("alg")))
        return {"mac": await self._run("mac", ops.sign, key.kid, m, None, req["data"])}

    async def macverify(self, key: KeyRef, req: dict) -> dict:
        mac = (await self.mac(key, req))["mac"]
        return {"result": hmac.compare_digest(mac, req["mac"])}

    async def wrap(self, key: KeyRef, subject: KeyRef, req: dict) -> dict:
        mech.check_key_format(subject.obj_type, subject.public_only, req.get("key_format"))
        mode = mech.wrap_mode(_asym_type(key) if key.obj_type != "AES" else "AES", req)
        if mode in ("KW", "KWP"):
            wrapped = await self._run("wrap", ops.wrap_aes, key.kid, subject, mode == "KWP")
        elif mode.hash == "SHA1":
            wrapped = await self._run(
                "wrap", ops.wrap, key.kid, True, subject.kid, Mechanism.RSA_PKCS_OAEP, ops.OAEP_SHA1
            )
        else:
            k = key.key_size // 8
            wrapped = await self._run("wrap", ops.wrap_rsa_oaep, key.kid, subject, mode.hash, k)
        return {"wrapped_key": wrapped}

    async def unwrap(self, key: KeyRef, new: NewKey, req: dict) -> KeyMaterial:
        if key.public_only:
            raise Unsupported("a public key cannot unwrap")
        mode = mech.wrap_mode(key.obj_type, req)
        data = req["wrapped_key"]
        if mode in ("KW", "KWP"):
            return await self._run("unwrap", ops.unwrap_aes, key.kid, new, data, mode == "KWP")
        if mode.hash != "SHA1":
            k = key.key_size // 8
            return await self._run("unwrap", ops.unwrap_rsa_oaep, key.kid, new, data, mode.hash, k)
        m, p = Mechanism.RSA_PKCS_OAEP, ops.OAEP_SHA1
        return await self._run("unwrap", ops.unwrap, key.kid, new, m, p, data)

    # -- streams (multi-part encryption and decryption; see ``streams``) ------

    async def stream_start(
        self, key: KeyRef, op: streams.Op, iv: bytes, ad: bytes | None
    ) -> streams.Op:
        """Open a stream's session(s) and start it (``op.kind`` is one of ``streams.KINDS``)."""
        return await self._run("stream", streams.start, op, key.kid, iv, ad)

    async def stream_update(self, op: streams.Op, data: bytes) -> bytes:
        return await self._run("stream", streams.update, op, data)

    async def stream_final(
        self, op: streams.Op, tag: bytes | None = None
    ) -> tuple[bytes, bytes | None]:
        return await self._run("stream", streams.final, op, tag)

    async def stream_abort(self, ops: list[streams.Op]) -> None:
        await self._run("stream", streams.abort_many, ops)

    async def derive(self, key: KeyRef, new: NewKey, spec: mech.DeriveSpec) -> KeyMaterial:
        """A new key from ``key`` by the token's encrypt-data derivation (AES, DES, DES3)."""
        if key.obj_type not in _SYMMETRIC:
            raise Unsupported(f"a {key.obj_type} key cannot derive by encrypt_data")
        cipher = "DES3" if key.obj_type == "DES" else key.obj_type
        return await self._run("derive", ops.derive_encrypt_data, key.kid, cipher, new, spec)

    async def agree(self, private: KeyRef, public: KeyRef, new: NewKey) -> KeyMaterial:
        if private.obj_type != "EC" or private.curve == "Ed25519" or private.public_only:
            raise Unsupported("agreement needs an EC private key (not Ed25519)")
        if _asym_type(public) != "EC" or public.curve != private.curve:
            raise BadRequest("the public key must be on the same curve", code="invalid_value")
        return await self._run("agree", ops.agree, private.kid, public.kid, private.curve, new)


def digest(req: dict) -> dict:
    """Re-exported from ``strongroomd.mechanisms`` (no token needed)."""
    return mech.digest(req)
