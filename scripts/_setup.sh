# Sourced by scripts/run, scripts/test and scripts/bench: install what is missing.
# Idempotent: a second run checks and does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

need_apt=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)  # the web console's editor
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)  # verifies the unit in tests
# The sandbox worker's seccomp filter (no network) is built with libseccomp.
compgen -G "/usr/lib/*/libseccomp.so.2" >/dev/null || [ -e /usr/lib/libseccomp.so.2 ] \
  || need_apt+=(libseccomp2)
# The PKCS#11 provider (pkcs11/): its build needs, and the tools its tests drive.
[ -e /usr/include/msgpack.h ] || need_apt+=(libmsgpack-dev)
[ -e /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || need_apt+=(libp11-kit-dev)
command -v make >/dev/null 2>&1 || need_apt+=(make)
[ -e /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so ] || compgen -G "/usr/lib/*/engines-3/pkcs11.so" >/dev/null \
  || need_apt+=(libengine-pkcs11-openssl)
command -v p11tool >/dev/null 2>&1 || need_apt+=(gnutls-bin)
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need_apt+=(openssh-client)
# Java (javac, java, keytool) for tests/pkcs11/test_java.py: SunPKCS11 on the module
{ command -v javac && command -v keytool; } >/dev/null 2>&1 || need_apt+=(default-jdk-headless)
# PostgreSQL for the multi-node tests (tests/multinode/pg.py runs initdb and postgres
# itself, as an unprivileged user, in a temporary directory): the binaries only.
# policy-rc.d below keeps the package from starting a server; its default cluster
# is not created (create_main_cluster = false).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
for extra in ${STRONGROOM_APT_EXTRA:-}; do
  dpkg -s "$extra" >/dev/null 2>&1 || need_apt+=("$extra")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  made_policy=""
  if [[ " ${need_apt[*]} " == *" postgresql "* ]]; then
    # No cluster made at install, and no service started (invoke-rc.d asks policy-rc.d).
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
      $SUDO chmod 755 /usr/sbin/policy-rc.d
      made_policy=1
    fi
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

extras="${STRONGROOM_PIP_EXTRAS:-}"
hash="$(cat "$ROOT/client/pyproject.toml" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
stamp="$VENV/.installed-$hash${extras:+-$extras}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
# Any install of these pyproject.toml files serves a run without extras (extras only add).
if [ ! -e "$stamp" ] && ! { [ -z "$extras" ] && compgen -G "$VENV/.installed-$hash*" >/dev/null; }; then
  echo "setup: installing the project into $VENV" >&2
  # Two distributions: the client (strongroom) first, then the daemon (strongroomd),
  # which depends on it.
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT/client" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}" >&2
  if [[ ",$extras," == *",dev,"* ]]; then
    # Fortanix DSM's CLI for tests/dsm/, without its declared dependencies: enum34 and
    # argparse are Python 2 backports (enum34 shadows the stdlib enum); the ones it
    # really uses (sdkms, requests, six, certifi, cryptography) come with the dev extra.
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "sdkms-cli==5.6.2919" >&2
  fi
  find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash*" -delete
  touch "$stamp"
fi

# The PKCS#11 provider: build pkcs11/ and place the module in .venv/lib/.
make -s -C "$ROOT/pkcs11" install DESTDIR="$VENV/lib" >&2

# The web console's editor (CodeMirror), pinned by console/package-lock.json.
CONSOLE="$ROOT/console"
if [ ! -e "$CONSOLE/node_modules/.package-lock.json" ] \
  || [ "$CONSOLE/package-lock.json" -nt "$CONSOLE/node_modules/.package-lock.json" ]; then
  echo "setup: installing the console's packages (npm ci)" >&2
  (cd "$CONSOLE" && npm ci --no-audit --no-fund --loglevel=error) >&2
fi
