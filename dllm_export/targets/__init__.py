"""Device profiles as data: which format, scheme, block size and kernel settings suit a device.

`dllm-export --target onnx --device arm64-dotprod --bits 4` fills every choice the user left
open from the profile, so an artifact can be built here for a device that is not this one;
`--device auto` picks the profile of this host. The numbers behind the choices are the
measurements in benchmarks/results/backend_speed_*.json (benchmarks/backend_speed.py) and
roofline_*.json (benchmarks/roofline.py). x86: the int8 head at accuracy level 4 (level 0 is
onnxruntime's dequantize-every-call 8-bit fallback), and threads that sleep rather than spin
(every ONNX block step measured faster without spinning on a 2-core AVX-512 host shared with
other work).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checks import is_int
from ..errors import InputError


@dataclass(frozen=True)
class DeviceProfile:
    """What suits one device class.

    Attributes:
        name / description: the profile's id and a line for humans.
        arch: "x86_64", "aarch64" or "cuda".
        cpu_flags: /proc/cpuinfo flags (x86) or features (arm64 "Features") the host must have
            for `--device auto` to pick this profile.
        targets: export targets in order of preference.
        scheme: the default scheme (the fastest of acceptable quality on this device).
        group_size: weight block size its kernels like (MatMulNBits block, must divide K for
            KleidiAI on arm64; GGUF block formats are always 32).
        onnx_format: "qdq" or "matmulnbits".
        accuracy_level: MatMulNBits compute precision for weight-only layers (4 = int8 dot products).
        gguf_quant: the GGUF type to build.
        threads: intra-op threads (0 = the runtime's default: all cores).
        providers: onnxruntime execution providers, in order.
        embed_head: ONNX embedding and LM head precision ("int8": 8-bit rows in blocks of 32, a
            quarter of fp32's bytes; "fp32").
        head_accuracy_level: MatMulNBits accuracy level of the int8 head (4 = int8 dot products; 0 =
            exact but onnxruntime's 8-bit fallback dequantizes the whole head every call).
        spinning: onnxruntime's intra-op threads spin while waiting for work (faster on an idle
            device, slower where other processes share the cores).
        progressive: grouped <= 4-bit weights under 8-bit activations (W4A8 with a group size) take
            progressive group scales (`--progressive`), so they run on the integer GEMM instead of
            MatMulNBits, and a per-channel W4A8 scheme left without a group size takes `group_size`
            (the same kernel, less error); `--no-progressive` keeps fp16 group scales, `--group-size 0`
            per channel.
        speed_note: where a target measured slower than another on this device class: which,
            against what, and the faster target ("" where not measured).
    """

    name: str
    description: str
    arch: str
    cpu_flags: tuple[str, ...]
    targets: tuple[str, ...]
    scheme: str
    group_size: int
    onnx_format: str
    accuracy_level: int
    gguf_quant: str
    threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    embed_head: str = "int8"
    head_accuracy_level: int = 4
    spinning: bool = True
    progressive: bool = False
    speed_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile(
        "x86-avx2", "x86-64 with AVX2/FMA (most laptops and servers since 2015)", "x86_64", ("avx2", "fma"),
        ("onnx", "gguf"), "W4A16", 32, "qdq", 4, "Q4_0", spinning=False),
    DeviceProfile(
        "x86-avx512-vnni", "x86-64 with AVX-512 VNNI (Ice Lake+, Zen 4+): int8 dot products; W8A8's integer "
        "GEMM measured 4.8x torch fp32 at a 128-token step (benchmarks/results/backend_speed_1b.json)",
        "x86_64", ("avx2", "fma", "avx512f", "avx512_vnni"), ("onnx", "gguf"), "W8A8", 128, "qdq", 4, "Q6_K",
        speed_note="gguf: llama.cpp recomputes the whole canvas every step (no KV cache for diffusion archs); "
        "its full step measured 1.16-1.88x torch fp32 (Q8_0 .. Q6_K, the fastest type here) but 0.56-0.91x "
        "torch bf16 on the anchor shape (benchmarks/results/llamacpp_speed_kquants.json): the faster targets "
        "are onnx (W8A8) and torch bf16 / --kernel int W8A8 with the dual cache", spinning=False,
        progressive=True),
    DeviceProfile(
        "arm64-dotprod", "arm64 with the dot-product extension (phones, Graviton 2, Apple M1+): onnxruntime's "
        "KleidiAI 4-bit kernels want symmetric blocks that are a multiple of 32 and divide K",
        "aarch64", ("asimddp",), ("onnx", "gguf"), "W4A16", 32, "qdq", 4, "Q4_0"),
    DeviceProfile(
        "arm64-i8mm", "arm64 with int8 matrix multiply (Graviton 3+, Apple M2+, recent phones): llama.cpp "
        "repacks Q4_0 for i8mm at load", "aarch64", ("asimddp", "i8mm"), ("gguf", "onnx"), "W4A16", 32, "qdq", 4,
        "Q4_0"),
    DeviceProfile(
        "cuda", "NVIDIA GPU through onnxruntime's CUDA execution provider (fp16/fp32 activations, 4-bit "
        "MatMulNBits)", "cuda", (), ("onnx",), "W4A16", 128, "matmulnbits", 0, "Q4_0",
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"), embed_head="fp32", head_accuracy_level=0),
)}


def host_flags() -> set[str]:
    """CPU feature flags of this host (x86 `flags`, arm64 `Features`), empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return set(line.split(":", 1)[1].split())
    return set()


# more threads than this per CPU only slow a decode down; 100000 would exhaust the process table
THREADS_PER_CPU = 8


def check_threads(n) -> int:
    """`n` if it is a thread count a runtime can take: an integer from 0 (one per physical core) to
    THREADS_PER_CPU per CPU; else InputError (100000 segfaulted torch and hung onnxruntime)."""
    cpus = os.cpu_count() or 1
    if not is_int(n) or n < 0:
        raise InputError(f"threads must be an integer >= 0 (0: one per physical core), got {n!r}")
    if n > THREADS_PER_CPU * cpus:
        raise InputError(f"{n} threads on {cpus} CPUs: at most {THREADS_PER_CPU * cpus} ({THREADS_PER_CPU} per CPU)")
    return int(n)


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core counted once, as
    llama.cpp's own tools count them): ggml's threads spin, so more threads than cores slow it."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX, arm64 FEAT_BF16


def has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the host has bf16 units (bf16 is then the torch int kernels' compute dtype)."""
    flags = host_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def detect(flags: set[str] | None = None, machine: str | None = None) -> DeviceProfile:
    """The most capable CPU profile this host satisfies (CUDA is never picked implicitly)."""
    flags = host_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    fits = [p for p in PROFILES.values() if p.arch == arch and set(p.cpu_flags) <= flags]
    if not fits:
        raise InputError(f"no device profile matches this host ({machine}); pass --device "
                         f"({', '.join(PROFILES)})")
    return max(fits, key=lambda p: len(p.cpu_flags))


def get_profile(name: str) -> DeviceProfile:
    """The profile called `name`, `auto` for this host's."""
    if name == "auto":
        return detect()
    if name not in PROFILES:
        raise InputError(f"unknown device {name!r} (choose from auto, {', '.join(PROFILES)})")
    return PROFILES[name]


__all__ = ["PROFILES", "DeviceProfile", "detect", "get_profile", "has_bf16", "host_flags"]
