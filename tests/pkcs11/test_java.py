"""Java's SunPKCS11 provider on the module: KeyStore, Signature, Cipher and keytool.

One javac per test process (the program is tests/pkcs11/java/StrongroomJava.java); each JVM
runs a list of commands and answers one line each, so a test pays one JVM start, not one per
check. The PIN (an app's API key) reaches Java through the environment, never argv.
"""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from strongroom import Client

from tests.conftest import unique
from tests.pkcs11.conftest import World, tool_env

SOURCE = Path(__file__).parent / "java" / "StrongroomJava.java"
DATA = b"signed in Java, kept in Strongroom"
P256 = ec.SECP256R1()
#: SunPKCS11 config lines for KeyAgreement: the derived secret may be read (EXPORT)
ECDH_ATTRIBUTES = """
attributes(generate, CKO_SECRET_KEY, CKK_GENERIC_SECRET) = {
  CKA_EXTRACTABLE = true
}
"""


@dataclass
class JavaWorld:
    """An app of its own (deterministic aliases) with keys and certificates made for Java."""

    world: World
    classes: Path
    config: Path
    api_key: str
    other_key: str
    peer: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(P256))
    names: dict[str, str] = field(default_factory=dict)  # role -> name
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> sobject

    @property
    def peer_spki(self) -> bytes:
        """An ECDH peer's public key (SubjectPublicKeyInfo DER)."""
        return self.peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def rsa_ciphertext(self) -> bytes:
        """DATA encrypted by cryptography to the Strongroom RSA key (PKCS#1 v1.5)."""
        pub = serialization.load_der_public_key(self.keys["rsa"]["pub_key"])
        return pub.encrypt(DATA, padding.PKCS1v15())

    def env(self, **extra: str) -> dict[str, str]:
        return tool_env(self.world, SR_PIN=self.api_key, SR_OTHER_PIN=self.other_key, **extra)

    def run(self, *commands: str, config: Path | None = None, **extra: str) -> list[str]:
        """One JVM: each command's answer line, in order."""
        cfg = str(config or self.config)
        r = subprocess.run(
            ["java", "-cp", str(self.classes), "StrongroomJava", cfg],
            input="".join(c + "\n" for c in commands),
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = r.stdout.splitlines()
        assert r.returncode == 0 and len(lines) == len(commands), (r.stdout, r.stderr)
        return lines


def cert_for(public_key: Any, cn: str) -> x509.Certificate:
    """A certificate for a Strongroom key's public half, issued by a throwaway CA."""
    ca = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def jw(world: World, tmp_path_factory: pytest.TempPathFactory) -> JavaWorld:
    tmp = tmp_path_factory.mktemp("java")
    # javac runs while the keys are made
    javac = subprocess.Popen(["javac", "-d", str(tmp), str(SOURCE)], stderr=subprocess.PIPE)
    config = tmp / "strongroom-java.cfg"
    config.write_text(f"name = Strongroom\nlibrary = {world.module}\nslot = 1\n")
    admin = Client(world.daemon.socket, world.daemon.admin_key)
    g = admin.request("POST", "/sys/v1/groups", {"name": unique("javag")})["group_id"]
    g_other = admin.request("POST", "/sys/v1/groups", {"name": unique("javag2")})["group_id"]
    app = admin.request("POST", "/sys/v1/apps", {"name": unique("javaapp"), "groups": [g]})
    other = admin.request("POST", "/sys/v1/apps", {"name": unique("java2"), "groups": [g_other]})
    admin.close()
    jw = JavaWorld(world, tmp, config, app["credential"]["api_key"], other["credential"]["api_key"])
    specs = {
        "rsa": {"obj_type": "RSA", "key_size": 2048},
        "ec": {"obj_type": "EC", "elliptic_curve": "NistP256"},
        "aes": {"obj_type": "AES", "key_size": 256},
        "aes_x": {"obj_type": "AES", "key_size": 128, "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"]},
        "vo": {"obj_type": "EC", "elliptic_curve": "NistP256", "key_ops": ["VERIFY"]},
        "hmac": {"obj_type": "HMAC", "key_size": 256},
        "ecdh": {"obj_type": "EC", "elliptic_curve": "NistP256", "key_ops": ["AGREEKEY"]},
        "bare": {"obj_type": "RSA", "key_size": 2048},  # no certificate: not a KeyStore entry
    }
    with Client(world.daemon.socket, jw.api_key) as c:
        for role, spec in specs.items():
            jw.names[role] = unique(f"java-{role}")
            jw.keys[role] = c.request("POST", "/crypto/v1/keys", {"name": jw.names[role], **spec})
        # a certificate for each key pair; one for a key that is not here (no pair)
        pubs = {r: jw.keys[r]["pub_key"] for r in ("rsa", "ec", "vo", "ecdh")}
        pubs["lone"] = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        for role, spki in pubs.items():
            pub = serialization.load_der_public_key(spki)
            jw.names[f"{role}_cert"] = name = unique(f"java-{role}-cert")
            der = cert_for(pub, name).public_bytes(serialization.Encoding.DER)
            body = {"name": name, "obj_type": "CERTIFICATE", "value": der}
            jw.keys[f"{role}_cert"] = c.request("PUT", "/crypto/v1/keys", body)
    with Client(world.daemon.socket, jw.other_key) as c:
        jw.names["other"] = unique("java-other")
        c.request("POST", "/crypto/v1/keys", {"name": jw.names["other"], "obj_type": "AES"})
    _, err = javac.communicate(timeout=120)
    assert javac.returncode == 0, err.decode()
    return jw


@pytest.fixture(scope="module")
def session(jw: JavaWorld) -> dict[str, str]:
    """One JVM for the app's checks: each command's answer by its name."""
    n, d = jw.names, DATA.hex()
    commands = {
        "login": "login SR_PIN",
        "aliases": "aliases",
        "rsa": f"sign {n['rsa_cert']} SHA256withRSA {d}",
        "pss": f"sign {n['rsa_cert']} RSASSA-PSS {d}",
        "ecdsa": f"sign {n['ec_cert']} SHA256withECDSA {d}",
        "verify_only": f"sign {n['vo_cert']} SHA256withECDSA {d}",
        "gcm": f"encrypt {n['aes_x']} AES/GCM/NoPadding {d} 12",
        "cbc": f"encrypt {n['aes_x']} AES/CBC/PKCS5Padding {d}",
        "cbc_sensitive": f"encrypt {n['aes']} AES/CBC/PKCS5Padding {d}",
        "gcm_sensitive": f"encrypt {n['aes']} AES/GCM/NoPadding {d} 12",
        "gcm_default_iv": f"encrypt {n['aes']} AES/GCM/NoPadding {d}",
        "other": f"encrypt {n['other']} AES/CBC/PKCS5Padding {d}",
        "hmac": f"mac {n['hmac']} HmacSHA256 {d}",
        "rsa_decrypt": f"rsadecrypt {n['rsa_cert']} RSA/ECB/PKCS1Padding {jw.rsa_ciphertext.hex()}",
        "ecdh_sensitive": f"ecdh {n['ecdh_cert']} {jw.peer_spki.hex()}",
        "gen_rsa": f"genpair RSA 2048 {d}",
        "gen_ec": f"genpair EC 256 {d}",
        "gen_rsa_1024": f"genpair RSA 1024 {d}",
        "gen_aes": f"genaes 256 {d}",
        "aliases_after": "aliases",
    }
    return dict(zip(commands, jw.run(*commands.values()), strict=True))


def answer(line: str) -> list[str]:
    """The fields of an "ok ..." answer."""
    assert line.startswith("ok"), line
    return line.split()[1:]


def aliases(line: str) -> dict[str, str]:
    """alias -> "kind:algorithm" from an aliases answer."""
    return dict(a.split(":", 1) for a in answer(line))


def test_keystore_aliases(session: dict[str, str], jw: JavaWorld) -> None:
    """Secret keys under their names; a key pair under its certificate's name (same CKA_ID)."""
    n = jw.names
    assert session["login"] == "ok SunPKCS11-Strongroom"
    assert aliases(session["aliases"]) == {
        n["aes"]: "key:AES",
        n["aes_x"]: "key:AES",
        n["rsa_cert"]: "key:RSA",
        n["ec_cert"]: "key:EC",
        n["vo_cert"]: "key:EC",
        n["ecdh_cert"]: "key:EC",
        n["hmac"]: "key:Generic_Secret",
    }
    # keys Java generated are session objects (transient keys): not entries, gone with the JVM
    assert aliases(session["aliases_after"]) == aliases(session["aliases"])
    with Client(jw.world.daemon.socket, jw.api_key) as c:
        names = {k["name"] for k in c.request("GET", "/crypto/v1/keys", {"limit": 100})}
    assert names == set(n.values()) - {n["other"]}


def public(jw: JavaWorld, role: str) -> Any:
    return serialization.load_der_public_key(jw.keys[role]["pub_key"])


def test_signatures_verify_with_cryptography(session: dict[str, str], jw: JavaWorld) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    for name, role, verify in (
        ("rsa", "rsa", lambda k, s: k.verify(s, DATA, padding.PKCS1v15(), hashes.SHA256())),
        ("pss", "rsa", lambda k, s: k.verify(s, DATA, pss, hashes.SHA256())),
        ("ecdsa", "ec", lambda k, s: k.verify(s, DATA, ec.ECDSA(hashes.SHA256()))),
    ):
        sig, good, bad = answer(session[name])
        verify(public(jw, role), bytes.fromhex(sig))
        # Java verified it too through the module (the certificate's public key, imported
        # as a session object), and refused it over other data
        assert (good, bad) == ("true", "false"), name


def test_key_ops_hold_in_java(session: dict[str, str]) -> None:
    """A key without SIGN signs nothing: CKR_KEY_FUNCTION_NOT_PERMITTED reaches Java."""
    assert session["verify_only"].startswith("err java.security.ProviderException")
    assert session["verify_only"].endswith("CKR_KEY_FUNCTION_NOT_PERMITTED")


def test_aes_in_java_decrypted_outside(session: dict[str, str], jw: JavaWorld) -> None:
    with Client(jw.world.daemon.socket, jw.api_key) as c:
        value = c.request("POST", "/crypto/v1/keys/export", {"kid": jw.keys["aes_x"]["kid"]})[
            "value"
        ]
        # an EXPORT key: cryptography with the exported value
        iv, ct = map(bytes.fromhex, answer(session["gcm"]))
        assert len(iv) == 12 and AESGCM(value).decrypt(iv, ct, None) == DATA
        iv, ct = map(bytes.fromhex, answer(session["cbc"]))
        dec = Cipher(algorithms.AES(value), modes.CBC(iv)).decryptor()
        unpad = sym_padding.PKCS7(128).unpadder()
        assert unpad.update(dec.update(ct) + dec.finalize()) + unpad.finalize() == DATA
        # a key that never leaves: the daemon decrypts what Java encrypted
        kid = {"kid": jw.keys["aes"]["kid"]}
        iv, ct = map(bytes.fromhex, answer(session["cbc_sensitive"]))
        out = c.request(
            "POST", "/crypto/v1/decrypt", {"key": kid, "mode": "CBC", "iv": iv, "cipher": ct}
        )
        assert out["plain"] == DATA
        iv, ct = map(bytes.fromhex, answer(session["gcm_sensitive"]))
        out = c.request(
            "POST",
            "/crypto/v1/decrypt",
            {"key": kid, "mode": "GCM", "iv": iv, "cipher": ct[:-16], "tag": ct[-16:]},
        )
        assert out["plain"] == DATA


def test_hmac_and_rsa_decryption(session: dict[str, str], jw: JavaWorld) -> None:
    """Mac HmacSHA256 with an HMAC key (a "Generic Secret" entry), the same MAC as the
    daemon's; RSA/ECB/PKCS1Padding decrypts what cryptography encrypted to the key."""
    (mac,) = answer(session["hmac"])
    with Client(jw.world.daemon.socket, jw.api_key) as c:
        body = {"key": {"kid": jw.keys["hmac"]["kid"]}, "alg": "SHA256", "data": DATA}
        assert c.request("POST", "/crypto/v1/mac", body)["mac"] == bytes.fromhex(mac)
    assert answer(session["rsa_decrypt"]) == [DATA.hex()]


def test_ecdh_needs_an_extractable_secret(session: dict[str, str], jw: JavaWorld) -> None:
    """KeyAgreement reads the derived secret's CKA_VALUE: Java asks for no CKA_EXTRACTABLE,
    so the secret stays in Strongroom (CKR_ATTRIBUTE_SENSITIVE) unless the SunPKCS11 config
    asks for it; then the secret is the one cryptography computes. AGREEKEY still rules."""
    line = session["ecdh_sensitive"]
    assert line.startswith("err java.security.ProviderException"), line
    assert line.endswith("CKR_ATTRIBUTE_SENSITIVE 0x11"), line
    config = jw.classes / "strongroom-ecdh.cfg"
    config.write_text(jw.config.read_text() + ECDH_ATTRIBUTES)
    login, secret, refused = jw.run(
        "login SR_PIN",
        f"ecdh {jw.names['ecdh_cert']} {jw.peer_spki.hex()}",
        f"ecdh {jw.names['ec_cert']} {jw.peer_spki.hex()}",  # no AGREEKEY
        config=config,
    )
    assert login == "ok SunPKCS11-Strongroom"
    mine = serialization.load_der_public_key(jw.keys["ecdh"]["pub_key"])
    assert answer(secret) == [jw.peer.exchange(ec.ECDH(), mine).hex()]
    assert refused.startswith("err java.security.ProviderException"), refused
    assert refused.endswith("CKR_KEY_FUNCTION_NOT_PERMITTED"), refused


def test_gcm_needs_a_12_byte_iv(session: dict[str, str]) -> None:
    """SunPKCS11 picks a 16-byte GCM IV by itself; the daemon takes 12 (as DSM): a clean refusal."""
    line = session["gcm_default_iv"]
    assert line.startswith("err java.security.InvalidKeyException"), line
    assert line.endswith("CKR_MECHANISM_PARAM_INVALID"), line


def test_other_groups_key_is_not_there(session: dict[str, str], jw: JavaWorld) -> None:
    assert jw.names["other"] not in session["aliases"]
    assert session["other"] == "err java.security.InvalidKeyException: Key must not be null"


def test_keys_generated_in_java(session: dict[str, str]) -> None:
    """KeyPairGenerator / KeyGenerator: transient keys in the daemon, used at once."""
    der, sig = map(bytes.fromhex, answer(session["gen_rsa"]))
    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    key.verify(sig, DATA, padding.PKCS1v15(), hashes.SHA256())
    der, sig = map(bytes.fromhex, answer(session["gen_ec"]))
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    key.verify(sig, DATA, ec.ECDSA(hashes.SHA256()))
    assert answer(session["gen_aes"]) == [DATA.hex()]
    # below the module's CKM_RSA_PKCS_KEY_PAIR_GEN range (C_GetMechanismInfo): Java says so
    line = session["gen_rsa_1024"]
    assert line.startswith("err java.security.InvalidParameterException"), line
    assert "RSA key must be at least 2048 bits" in line, line


def test_other_app_and_wrong_pin(jw: JavaWorld) -> None:
    """A wrong PIN is the IOException Java users know (cause: FailedLoginException,
    CKR_PIN_INCORRECT); another app logs in and sees its own key only."""
    bad, good, listed = jw.run(
        "login SR_BAD", "login SR_OTHER_PIN", "aliases", SR_BAD="bm90OmFrZXk="
    )
    assert bad.startswith("err java.io.IOException"), bad
    assert "javax.security.auth.login.FailedLoginException" in bad
    assert bad.endswith("CKR_PIN_INCORRECT"), bad
    assert good == "ok SunPKCS11-Strongroom"
    assert aliases(listed) == {jw.names["other"]: "key:AES"}


def keytool(jw: JavaWorld, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    cmd = ["keytool", "-list", "-keystore", "NONE", "-storetype", "PKCS11"]
    cmd += ["-providerClass", "sun.security.pkcs11.SunPKCS11", "-providerArg", str(jw.config)]
    return subprocess.run(
        [*cmd, *args], env=jw.env(**extra), capture_output=True, text=True, timeout=120
    )


def test_keytool_lists_the_entries(jw: JavaWorld, tmp_path: Path) -> None:
    r = keytool(jw, "-storepass:env", "SR_PIN")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Your keystore contains 7 entries" in r.stdout
    for role in ("rsa_cert", "ec_cert", "vo_cert", "ecdh_cert"):
        assert f"{jw.names[role]}, PrivateKeyEntry" in r.stdout
    for role in ("aes", "aes_x", "hmac"):
        assert f"{jw.names[role]}, SecretKeyEntry" in r.stdout
    # the PIN from a file (0600); a wrong one fails to load the keystore
    pin = tmp_path / "pin"
    pin.write_text("bm90OmFrZXk=\n")
    pin.chmod(0o600)
    r = keytool(jw, "-storepass:file", str(pin))
    assert r.returncode != 0
    assert "keytool error: java.io.IOException: load failed" in r.stdout + r.stderr
