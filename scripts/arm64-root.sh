#!/usr/bin/env bash
# An arm64 Debian root with aarch64 onnxruntime + numpy, run under qemu-user emulation, to check the
# ARM artifacts (`--device arm64-dotprod` / `arm64-i8mm`) for correctness on an x86 machine.
#
#   sudo bash scripts/arm64-root.sh            # -> .arm64-root/ (about 10 min, 0.5 GB)
#   DLLM_ARM64_ROOT=.arm64-root .venv/bin/python -m pytest -q tests/test_arm64.py
#
# Needs Debian's qemu-user-static, binfmt-support and debootstrap (installed here with apt-get when
# missing) and root (debootstrap, chroot). tests/test_arm64.py is skipped where the root is absent.
set -euo pipefail
ROOT="${DLLM_ARM64_ROOT:-$(cd "$(dirname "$0")/.." && pwd)/.arm64-root}"
SUITE="${DLLM_ARM64_SUITE:-bookworm}"   # Python 3.11, as the x86 side
MIRROR="${DLLM_ARM64_MIRROR:-http://deb.debian.org/debian}"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static binfmt-support debootstrap
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    rm -rf "$ROOT.tmp"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOT.tmp" "$MIRROR"
    mv "$ROOT.tmp" "$ROOT"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# pip inside the root trusts what the host trusts (a proxy's CA, say); Debian's pip reads the system bundle
HOST_CA="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
cp "$HOST_CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"
if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
    chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
fi
env -u PIP_FIND_LINKS -u PIP_CERT -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE \
    chroot "$ROOT" /opt/venv/bin/python -m pip install --quiet --disable-pip-version-check "numpy>=1.26" "onnxruntime>=1.22"
chroot "$ROOT" /opt/venv/bin/python -c "import onnxruntime, numpy, platform; print(platform.machine(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
touch "$ROOT/opt/dllm-ready"  # tests/test_arm64.py runs only against a finished root
