#!/usr/bin/env bash
# An arm64 Debian root with aarch64 onnxruntime + numpy and llama-cpp-python, run under qemu-user
# emulation, to check the ARM artifacts (`--device arm64-dotprod` / `arm64-i8mm`, GGUF) for
# correctness on an x86 machine.
#
#   sudo bash scripts/arm64-root.sh            # -> .arm64-root/ (about 10 min, 0.5 GB)
#   DLLM_ARM64_ROOT=.arm64-root .venv/bin/python -m pytest -q tests/test_arm64.py
#
# Needs Debian's qemu-user-static, binfmt-support and debootstrap, and for llama.cpp the aarch64 cross
# toolchain (g++-aarch64-linux-gnu) and cmake (all installed here with apt-get when missing), and root
# (debootstrap, chroot). Each step is skipped when already done. tests/test_arm64.py is skipped where
# the root is absent.
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

# --- llama-cpp-python for aarch64, cross-compiled here (pip would compile llama.cpp under qemu: hours) ---
# The sdist's vendored llama.cpp built with Debian's aarch64 cross toolchain for a generic
# armv8.2-a+dotprod (qemu's `max` CPU, most phones), its pure-Python `llama_cpp` package copied into
# /opt/venv with the libraries in llama_cpp/lib/, where its ctypes loader looks. Same version as the
# x86 side: the version scripts/setup.sh pins. DLLM_ARM64_LLAMA=0 skips this part.
PINNED="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/setup.sh")"
LLAMA_PY_VERSION="${DLLM_LLAMA_CPP_PYTHON:-$PINNED}"
LLAMA_ARCH="${DLLM_ARM64_LLAMA_ARCH:-armv8.2-a+dotprod}"
LLAMA_MARK="$ROOT/opt/dllm-llama-ready"   # holds "version arch"; tests/test_arm64.py's GGUF cases need it
if [ "${DLLM_ARM64_LLAMA:-1}" != 0 ] && [ "$(cat "$LLAMA_MARK" 2>/dev/null)" != "$LLAMA_PY_VERSION $LLAMA_ARCH" ]; then
    rm -f "$LLAMA_MARK"
    if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v cmake >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake
    fi
    WORK="${DLLM_ARM64_BUILD:-${TMPDIR:-/tmp}/dllm-arm64-llama-$LLAMA_PY_VERSION}"  # kept until done: a rerun resumes
    SRC="$WORK/llama_cpp_python-$LLAMA_PY_VERSION"
    if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
        HOST_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"   # any pip will do: only a download
        [ -x "$HOST_PY" ] || HOST_PY=python3
        mkdir -p "$WORK"
        "$HOST_PY" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
            --dest "$WORK" "llama-cpp-python==$LLAMA_PY_VERSION"
        tar -xzf "$WORK/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz" -C "$WORK"
    fi
    # only the llama and ggml shared libraries (target `llama`): no llava/mtmd, no common/http code,
    # no OpenMP (ggml's own thread pool; the root has no libgomp), no GPU backends
    cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$LLAMA_ARCH" -DGGML_OPENMP=OFF \
        -DGGML_CCACHE=OFF -DSKBUILD_PLATLIB_DIR="$WORK/unused" -Wno-dev >"$WORK/cmake.log"
    cmake --build "$WORK/build" --target llama -j "$(nproc)" >"$WORK/build.log"
    SITE="$(chroot "$ROOT" /opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    PKG="$ROOT$SITE/llama_cpp"
    rm -rf "$PKG" "$ROOT$SITE"/llama_cpp_python-*.dist-info
    cp -r "$SRC/llama_cpp" "$PKG"
    mkdir -p "$PKG/lib"
    cp -a "$WORK/build/bin"/lib*.so* "$PKG/lib/"   # libllama, libggml, libggml-base, libggml-cpu (+ soname links)
    # a dist-info, so that pip inside the root sees llama-cpp-python as installed
    DIST="$ROOT$SITE/llama_cpp_python-$LLAMA_PY_VERSION.dist-info"
    mkdir -p "$DIST"
    cp "$SRC/PKG-INFO" "$DIST/METADATA"
    echo "dllm-export scripts/arm64-root.sh" >"$DIST/INSTALLER"
    (cd "$ROOT$SITE" && find llama_cpp "${DIST##*/}" \( -type f -o -type l \) -printf '%p,,\n' >"$DIST/RECORD")
    # its Python dependencies: the unconditional Requires-Dist lines (no extras)
    mapfile -t LLAMA_DEPS < <(sed -n 's/^Requires-Dist: \([^;]*\)$/\1/p' "$SRC/PKG-INFO")
    env -u PIP_FIND_LINKS -u PIP_CERT -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE \
        chroot "$ROOT" /opt/venv/bin/python -m pip install --quiet --disable-pip-version-check "${LLAMA_DEPS[@]}"
    chroot "$ROOT" /opt/venv/bin/python -c "import llama_cpp, platform; print(platform.machine(), 'llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode().strip())"
    echo "$LLAMA_PY_VERSION $LLAMA_ARCH" >"$LLAMA_MARK"
    rm -rf "$WORK"
fi
