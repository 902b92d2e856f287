"""A threaded PKCS#11 host for test_faults.py: signs in a loop until told to stop.

argv: module path, API key, key label, threads, public key (DER, hex). Prints READY, ERRORS and
RECOVERED as they happen, then (after "stop" on stdin) one JSON summary line.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Mechanism, ObjectClass


def main() -> None:
    module, api_key, label, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    lib = pkcs11.lib(module)
    tok = lib.get_token(token_label="strongroom")
    login = tok.open(user_pin=api_key)  # holds the application's login
    verifier = serialization.load_der_public_key(bytes.fromhex(sys.argv[5]))
    lock = threading.Lock()
    stats = {"ok": 0, "errors": {}, "bad": 0, "ok_after_error": 0}
    stop = threading.Event()
    said: set[str] = set()

    def say(word: str) -> None:
        if word not in said:
            said.add(word)
            print(word, flush=True)

    def work(i: int) -> None:
        with tok.open() as s:
            k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            j = 0
            while not stop.is_set():
                j += 1
                msg = f"{i}-{j}".encode()
                try:
                    sig = k.sign(msg, mechanism=Mechanism.ECDSA_SHA256)
                except pkcs11.exceptions.PKCS11Error as exc:
                    with lock:
                        name = type(exc).__name__
                        stats["errors"][name] = stats["errors"].get(name, 0) + 1
                    say("ERRORS")
                    time.sleep(0.02)
                    continue
                half = len(sig) // 2
                der = encode_dss_signature(
                    int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
                )
                try:
                    verifier.verify(der, msg, ec.ECDSA(hashes.SHA256()))
                except Exception:
                    with lock:
                        stats["bad"] += 1
                with lock:
                    stats["ok"] += 1
                    if stats["errors"]:
                        stats["ok_after_error"] += 1
                        if stats["ok_after_error"] >= 20:
                            say("RECOVERED")
                    elif stats["ok"] >= 20:
                        say("READY")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(60)
    login.close()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
