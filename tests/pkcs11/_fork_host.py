"""A PKCS#11 host that forks: argv module path, API key, key label.

The parent initialises the module and signs; the child calls C_Initialize
again (PKCS#11 2.40 6.7.7), logs in and signs; then the parent signs again.
Prints one line per signature: "<who> <hex signature>"."""

from __future__ import annotations

import os
import sys

import pkcs11
from pkcs11 import Mechanism, ObjectClass


def sign(lib: pkcs11.lib, api_key: str, label: str, who: str) -> None:
    tok = lib.get_token(token_label="strongroom")
    with tok.open(user_pin=api_key) as s:
        k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        sig = k.sign(f"signed by the {who}".encode(), mechanism=Mechanism.ECDSA_SHA256)
    print(who, sig.hex(), flush=True)


def main() -> None:
    module, api_key, label = sys.argv[1:4]
    lib = pkcs11.lib(module)
    sign(lib, api_key, label, "parent")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The module forgot everything at fork: the child must initialise it again.
            try:
                lib.get_token(token_label="strongroom")
                print("child-not-reset", flush=True)
            except pkcs11.exceptions.PKCS11Error as e:
                print("child-before-init", type(e).__name__, flush=True)
            lib.reinitialize()
            sign(lib, api_key, label, "child")
            code = 0
        except BaseException as e:
            print("child-error", repr(e), flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("child-exit", os.waitstatus_to_exitcode(status), flush=True)
    sign(lib, api_key, label, "parent-after")


if __name__ == "__main__":
    main()
