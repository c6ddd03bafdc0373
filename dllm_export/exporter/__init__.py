"""Exporters: checkpoint (float or quantized) -> an edge artifact, and the one-call `export` that
quantizes and exports for a target.

    from dllm_export.exporter import export
    export("default", "out/onnx-w4", target="onnx", bits=4, method="gptq")
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..fileio import temp_folder
from ..quant.schemes import fit_group

# target -> (one-line description, weight bit-widths it can carry)
TARGETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "onnx": ("onnxruntime graph, QDQ or MatMulNBits weights", (2, 3, 4, 5, 6, 7, 8, 16, 32)),
    "gguf": ("llama.cpp file, arch llada / dream, Q4_0 / Q4_1 / Q5_x / Q8_0 / K-quants", (4, 5, 8, 16, 32)),
}
# GGUF: bits -> the block type a symmetric group-32 PTQ grid is written as exactly
_GGUF_BY_BITS = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0", 16: "F16", 32: "F32"}


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the artifact folder and its manifest."""

    path: Path
    manifest: dict
    quantize_seconds: float
    export_seconds: float


@dataclass(frozen=True)
class ExportRequest:
    """The arguments of `export` as given (None: left open, to the device profile or the target)."""

    target: str = "onnx"
    bits: int | None = None
    method: str | None = None
    scheme: str | None = None
    group_size: int | None = None
    weight_format: str | None = None
    accuracy_level: int | None = None
    act_kernel: str = "auto"
    quant: str | None = None
    device: str | None = None
    embed_head: str | None = None
    quantize_options: dict = field(default_factory=dict)
    extra_manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        import dataclasses

        from ..checks import check_fields
        from ..quant import QuantizeConfig

        check_fields(self, ints=("bits", "group_size", "accuracy_level"),
                     strs=("target", "method", "scheme", "weight_format", "act_kernel", "quant", "device",
                           "embed_head"))
        for name in ("quantize_options", "extra_manifest"):
            if not isinstance(getattr(self, name), dict):
                raise InputError(f"{name} must be a dict, got {getattr(self, name)!r:.60}")
        unknown = sorted(set(self.quantize_options) - {f.name for f in dataclasses.fields(QuantizeConfig)})
        if unknown:  # QuantizeConfig(**options) would fail with a TypeError after the plan
            raise InputError(f"unknown quantize option(s) {', '.join(map(str, unknown))} (see quant.QuantizeConfig)")


@dataclass(frozen=True)
class ExportPlan:
    """One export resolved and checked before any calibration runs.

    Attributes:
        target: "onnx" or "gguf".
        source: the checkpoint folder.
        qcfg: the PTQ run that makes the quantized checkpoint to export, or None (export `source` as is).
        config: the target's writer settings (`OnnxExportConfig` / `GgufExportConfig`).
        extra_manifest: recorded in the artifact manifest (the device profile, a mixed-precision allocation).
    """

    target: str
    source: Path
    qcfg: object | None
    config: object
    extra_manifest: dict

    def write(self, checkpoint: Path, out: Path) -> Path:
        """Write the artifact of `checkpoint` (the source, or its quantized form) into `out`."""
        if self.target == "onnx":
            from .onnx import export_onnx

            return export_onnx(checkpoint, out, self.config, extra_manifest=self.extra_manifest)
        from .gguf import export_gguf

        return export_gguf(checkpoint, out, self.config, extra_manifest=self.extra_manifest)


def export(model: str | Path, out: str | Path, *, target: str = "onnx", bits: int | None = None,
           method: str | None = None, scheme: str | None = None, group_size: int | None = None,
           weight_format: str | None = None, accuracy_level: int | None = None, act_kernel: str = "auto",
           quant: str | None = None, device: str | None = None, embed_head: str | None = None,
           quantize_options: dict | None = None, extra_manifest: dict | None = None,
           progress: bool = False) -> ExportResult:
    """Quantize `model` with a PTQ method where the request needs it, then export it for `target`.

    Args:
        model: checkpoint folder, `default` or `default-dream`, or a quantized checkpoint (exported as is).
        out: artifact folder (must not exist or be empty; written atomically).
        target: "onnx" or "gguf".
        bits: weight bits; picks scheme W{bits}A16 unless `scheme` is given (then it overrides its bits).
            None / 16 / 32 without a scheme exports float weights.
        method / scheme / group_size / quantize_options: the PTQ run (see `quant.QuantizeConfig`;
            method None = its default, GPTQ). A method on an export that rounds nothing is refused.
        weight_format / accuracy_level / act_kernel / embed_head: the ONNX graph (see
            `exporter.onnx.OnnxExportConfig`); embed_head None = the device profile's, else fp32.
        quant: GGUF type. Q4_0 / Q5_0 / Q8_0 / Q4_1 / Q5_1 and the K-quants Q2_K .. Q6_K: `method`
            rounds a grid of that format (group-32 blocks, or 256-weight super-blocks with integer
            group scales), written exactly; F32 / F16 / BF16 and llama.cpp's recipes (Q4_K_M, ...):
            float weights (the recipes rounded by llama.cpp's quantizer). Default: from `bits`
            (4 -> Q4_0, 8 -> Q8_0).
        device: a profile of `dllm_export.targets` (or "auto" for this host) that fills every choice
            left open (scheme, group size, ONNX format and accuracy level, GGUF type, threads) and is
            recorded in the manifest for the runtime.
        extra_manifest: entries added to the artifact's manifest (the mixed-precision allocation).
    """
    req = ExportRequest(target=target, bits=bits, method=method, scheme=scheme, group_size=group_size,
                        weight_format=weight_format, accuracy_level=accuracy_level, act_kernel=act_kernel,
                        quant=quant, device=device, embed_head=embed_head,
                        quantize_options={} if quantize_options is None else quantize_options,
                        extra_manifest={} if extra_manifest is None else extra_manifest)
    plan = plan_export(model, out, req)
    return run_plan(plan, Path(out), progress=progress)


# request fields only one target reads: (that target, the CLI flag, the unset value); given to the
# other target they would be dropped without a word (--target onnx --quant Q4_0 built a float file)
TARGET_OPTIONS = {"quant": ("gguf", "--quant", None), "weight_format": ("onnx", "--format", None),
                  "accuracy_level": ("onnx", "--accuracy-level", None), "act_kernel": ("onnx", "--act-kernel", "auto"),
                  "embed_head": ("onnx", "--embed-head", None)}


def plan_export(model: str | Path, out: str | Path, req: ExportRequest) -> ExportPlan:
    """Resolve `req` for its target (device profile defaults, then the target's rules) and check it:
    every error an exporter would raise about bits, groups, formats or files comes here, before
    any calibration runs."""
    from ..fileio import check_output_folder
    from ..models.checkpoint import is_quantized, resolve_checkpoint

    if req.target not in TARGETS:
        raise InputError(f"unknown export target {req.target!r} (choose from {', '.join(TARGETS)})")
    for name, (owner, flag, unset) in TARGET_OPTIONS.items():
        if owner != req.target and getattr(req, name) != unset:
            raise InputError(f"{flag} applies to --target {owner} only; --target {req.target} does not read it")
    allowed = TARGETS[req.target][1]
    if req.bits is not None and req.bits not in allowed:
        raise InputError(f"target {req.target} cannot carry {req.bits}-bit weights "
                         f"(supported: {', '.join(map(str, allowed))})")
    src = resolve_checkpoint(model)
    quantized = is_quantized(src)
    if quantized:
        _check_quantized_input(src, req)
    check_output_folder(out)
    extra = dict(req.extra_manifest)
    profile = None
    if req.device is not None:
        from ..targets import get_profile

        profile = get_profile(req.device)
        if req.target not in profile.targets:  # the manifest would name a device that does not run it
            raise InputError(f"device profile {profile.name} runs {' / '.join(profile.targets)} artifacts, "
                             f"not --target {req.target}")
        extra["device"] = profile.to_dict()
    plan = RESOLVERS[req.target](req, src, profile, extra)
    if not quantized:
        _check_ptq_read(plan, req)
    return plan


# request fields that choose a PTQ grid: a quantized checkpoint is exported on its own grid, so given
# with one they would be dropped without a word (--bits 8 on a W4 checkpoint wrote a W4 artifact)
GRID_OPTIONS = {"bits": "--bits", "scheme": "--scheme", "group_size": "--group-size"}


def _check_quantized_input(src: Path, req: ExportRequest) -> None:
    """A quantized checkpoint is written as it is: refuse the options that would choose another grid."""
    grid = [flag for name, flag in GRID_OPTIONS.items() if getattr(req, name) is not None]
    grid += ["--method"] * (req.method is not None)
    if grid:
        raise InputError(f"{src} is a quantized checkpoint, exported on its own grid: drop {' / '.join(grid)} "
                         f"(to change the grid, quantize the float checkpoint it was made from)")


def _check_ptq_read(plan: "ExportPlan", req: ExportRequest) -> None:
    """Refuse the PTQ options of an export that rounds nothing (a float export, a llama.cpp recipe
    such as Q4_K_M, which its own quantizer rounds): they would be dropped without a word."""
    from .gguf import LLAMA_QUANTS

    if plan.qcfg is not None:
        return
    given = [f"{flag} {getattr(req, name)}" for name, flag in (("method", "--method"), *GRID_OPTIONS.items())
             if getattr(req, name) is not None and not (name == "bits" and req.bits >= 16)]
    given += ["--progressive"] * bool(req.quantize_options.get("progressive"))
    if not given:
        return
    it = "it" if len(given) == 1 else "them"
    if req.quant in LLAMA_QUANTS:
        why, fix = f"--quant {req.quant} is llama.cpp's recipe, which its own quantizer rounds", ""
    elif req.quant is not None:  # F16 / BF16 / F32
        why, fix = f"--quant {req.quant} keeps float weights", ""
    else:
        why, fix = "this export keeps float weights", ", or give --bits / --scheme to quantize"
    raise InputError(f"{' / '.join(given)}: nothing reads {it}: {why} (no PTQ runs); drop {it}{fix}")


def run_plan(plan: ExportPlan, out: Path, progress: bool = False) -> ExportResult:
    """Run a plan: quantize into a temp folder beside `out` when it says so, then write the artifact."""
    import json
    import time

    t0 = time.perf_counter()
    t_q = 0.0
    if plan.qcfg is None:
        path = plan.write(plan.source, out)
    else:
        from ..quant import quantize

        # named like every temporary folder for `out`, so a run killed here is cleaned up by the next
        work = temp_folder(out, "quantized")
        try:
            qdir = quantize(plan.source, work / "q", plan.qcfg, progress=progress)
            t_q = time.perf_counter() - t0
            path = plan.write(qdir, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return ExportResult(Path(path), manifest, round(t_q, 3), round(time.perf_counter() - t0 - t_q, 3))


def _plan_onnx(req: ExportRequest, src: Path, profile, extra: dict) -> ExportPlan:
    """ONNX: the profile's scheme / format / accuracy level / group / progressive scales; MatMulNBits'
    bit and block rules; `bits` with a scheme overrides its weight bits."""
    from ..formats import MATMULNBITS_BITS
    from ..models.checkpoint import is_quantized
    from .onnx import OnnxExportConfig

    quantized_input = is_quantized(src)
    scheme, group_size, accuracy_level, weight_format = req.scheme, req.group_size, req.accuracy_level, req.weight_format
    embed_head, head_acc = req.embed_head, 0
    if profile is not None:
        embed_head = embed_head or profile.embed_head  # edge profiles: an 8-bit embedding and head
        head_acc = profile.head_accuracy_level
        if req.bits is None and scheme is None and not quantized_input:
            scheme = profile.scheme
        weight_format = weight_format or profile.onnx_format
        weight_only = (scheme or f"W{req.bits}A16").upper().endswith("A16")
        if accuracy_level is None and weight_only:
            accuracy_level = profile.accuracy_level
        # weight-only grids take the profile's block; so does per-channel W4A8 where progressive groups run
        # the same int8 GEMM at the same speed with a fifth less KLD (benchmarks/results/onnx_w4_choices.md)
        if group_size is None and (weight_only or (scheme and _fills_progressive_groups(profile, req, scheme))):
            group_size = fit_group(profile.group_size, _widths(src))
    ocfg = OnnxExportConfig(weight_format=weight_format or "qdq", accuracy_level=accuracy_level,
                            act_kernel=req.act_kernel, embed_head=embed_head or "fp32", head_accuracy_level=head_acc)
    if ocfg.weight_format == "matmulnbits" and req.bits is not None and req.bits not in (*MATMULNBITS_BITS, 16, 32):
        raise InputError(f"--format matmulnbits stores 2, 4 or 8-bit weights, not {req.bits}-bit (use --format qdq)")
    needs_ptq = not quantized_input and not (scheme is None and (req.bits is None or req.bits >= 16))
    if needs_ptq:
        scheme = scheme or f"W{req.bits}A16"
    _check_onnx_reads(req, scheme if needs_ptq else _source_scheme(src) if quantized_input else None)
    qcfg = None
    if needs_ptq:
        opts = dict(req.quantize_options)
        if req.bits is not None and req.bits < 16:  # with a scheme, `bits` overrides its weight bits
            opts.setdefault("bits", req.bits)
        if profile is not None and profile.progressive and "progressive" not in opts:
            opts["progressive"] = _progressive_applies(scheme, req.bits, group_size)
        qcfg = _quantize_config(req, scheme, group_size, opts)
        _precheck_onnx(src, qcfg, ocfg)
    return ExportPlan("onnx", src, qcfg, ocfg, extra)


def _source_scheme(src: Path) -> str | None:
    """The scheme a quantized checkpoint was made with (its manifest's), None where it names none."""
    from ..quant.load import read_manifest

    return read_manifest(src).get("scheme")


def _check_onnx_reads(req: ExportRequest, scheme: str | None) -> None:
    """Refuse the ONNX options the graph would not read: on float weights (`scheme` None) the
    quantized weights' format, accuracy level and activation kernel; on a weight-only scheme the
    activation kernel. Only what was asked is checked: a device profile fills what applies."""
    from ..quant import get_scheme

    names = ("weight_format", "accuracy_level", "act_kernel") if scheme is None else ("act_kernel",)
    given = [TARGET_OPTIONS[n][1] for n in names if getattr(req, n) != TARGET_OPTIONS[n][2]]
    if scheme is None and given:
        raise InputError(f"{' / '.join(given)} {'sets' if len(given) == 1 else 'set'} how quantized weights run; "
                         f"this export keeps float weights (give --bits or --scheme)")
    if given and get_scheme(scheme).weight_only:
        raise InputError(f"--act-kernel runs a scheme's 8-bit activations; {scheme.upper()} quantizes weights only")


def _fills_progressive_groups(profile, req: ExportRequest, scheme: str) -> bool:
    """Whether a profile with progressive scales gives a per-channel <= 4-bit W*A8 scheme its group size
    (not when the user keeps fp16 group scales, which would move the layers to MatMulNBits)."""
    from ..quant import get_scheme

    sch = get_scheme(scheme)
    return (profile.progressive and req.quantize_options.get("progressive", True) and sch.group_size == 0
            and _progressive_applies(scheme, req.bits, profile.group_size))


def _progressive_applies(scheme: str, bits: int | None, group_size: int | None) -> bool:
    """A profile's progressive default reaches grouped <= 4-bit weights under 8-bit activations
    (grouped W4A8), the grids MatMulNBits would otherwise run."""
    from ..quant import get_scheme

    sch = get_scheme(scheme)
    group = sch.group_size if group_size is None else group_size
    return sch.a_bits == 8 and (bits or sch.w_bits) <= 4 and group > 0


def _plan_gguf(req: ExportRequest, src: Path, profile, extra: dict) -> ExportPlan:
    """GGUF: the profile's type; a block type (Q4_0, ...) is a group-32 PTQ grid written exactly."""
    from ..formats import GGUF_BLOCK
    from ..models.checkpoint import is_quantized
    from ..quant import get_scheme
    from ..quant.kquant import BLOCK_GRIDS, KQUANTS
    from .gguf import BLOCK_TYPES, GgufExportConfig, check_tokenizer
    from .gguf_vocab import read_vocab

    quantized_input = is_quantized(src)
    bits, scheme, quant = req.bits, req.scheme, req.quant
    if profile is not None and bits is None and quant is None:
        quant = profile.gguf_quant
    if quant is None and bits is None and scheme is not None:
        bits = get_scheme(scheme).w_bits
    quant = quant or (None if quantized_input else _GGUF_BY_BITS.get(bits or 16))
    if quant is not None and bits is not None and quant in BLOCK_TYPES and int(quant[1]) != bits:
        raise InputError(f"--quant {quant} stores {quant[1]}-bit weights, not {bits}-bit")
    if scheme is not None and not get_scheme(scheme).weight_only:
        raise InputError(f"GGUF carries weight-only schemes; {scheme} quantizes activations, which llama.cpp "
                         f"does itself. Use --target onnx for {scheme}")
    if scheme is not None and scheme.upper() not in ("W4A16", "W5A16", "W8A16"):
        raise InputError(f"GGUF block types carry 4, 5 or 8-bit weights, not {scheme}'s {get_scheme(scheme).w_bits}; "
                         f"use --target onnx for {scheme}")
    needs_ptq = not quantized_input and quant in BLOCK_TYPES
    if req.quantize_options.get("progressive"):
        raise InputError("--progressive scales are an ONNX int8-GEMM grid: GGUF's block types store their own "
                         "scales (use --target onnx)")
    read_vocab(src, _dims(src).vocab_rows)  # the vocabulary GGUF embeds: refused now, not after calibration
    qcfg = None
    if needs_ptq:
        if req.group_size not in (None, GGUF_BLOCK):
            raise InputError(f"GGUF block formats hold groups of {GGUF_BLOCK} weights, not {req.group_size}")
        for K in _widths(src):
            if K % GGUF_BLOCK:
                raise InputError(f"GGUF block formats need input widths divisible by {GGUF_BLOCK}; "
                                 f"this model has {K}")
        bits = int(quant[1])
        if req.quantize_options.get("kquant"):  # a K-quant mix (--scheme auto --kquants): its layer_bits
            qcfg = _quantize_config(req, "W4A16", None, req.quantize_options)
        elif quant in KQUANTS:  # a K-quant grid; layers whose width 256 does not divide take its fallback
            qcfg = _quantize_config(req, f"W{bits}A16", None, {**req.quantize_options, "kquant": quant})
        else:  # the block type's own grid
            g = BLOCK_GRIDS[quant]
            opts = {**req.quantize_options, "bits": g.bits, "sym": g.sym, "zero_kind": g.zero_kind}
            qcfg = _quantize_config(req, f"W{bits}A16", GGUF_BLOCK, opts)
        check_tokenizer(src)  # llama.cpp tokenizes like the checkpoint, or refused before calibrating
    return ExportPlan("gguf", src, qcfg, GgufExportConfig(quant=None if needs_ptq else quant), extra)


RESOLVERS = {"onnx": _plan_onnx, "gguf": _plan_gguf}


def _quantize_config(req: ExportRequest, scheme: str, group_size: int | None, opts: dict):
    from ..quant import QuantizeConfig

    method = {} if req.method is None else {"method": req.method}
    return QuantizeConfig(**method, scheme=scheme, group_size=group_size, **opts)


def _dims(src: Path):
    from ..models import family_for
    from ..models.checkpoint import read_config

    config = read_config(src)
    return family_for(config.get("model_type")).parse_config(config).dims


def _widths(src: Path) -> list[int]:
    dims = _dims(src)
    return [dims.d_model, dims.n_heads * dims.head_dim, dims.mlp_hidden]


def _precheck_onnx(src: Path, qcfg, ocfg) -> None:
    """Raise the errors `export_onnx` would raise for this grid, before any quantization runs."""
    from ..formats import check_matmulnbits
    from ..quant.driver import fit_group_size

    widths = _widths(src)
    w = fit_group_size(qcfg, widths).weight_config()
    if not w.sym and w.zero_kind == "float":
        raise InputError("float minimums (zero_kind='float', GGUF Q4_1 style) have no exact ONNX form; "
                         "use integer zero points (the default) or --target gguf")
    if ocfg.weight_format == "matmulnbits":
        from ..quant.mixed import layer_grid, option_order

        # the scheme's grid and, in a mix, every layer's (its bits and group size)
        options = [None, *sorted(set(dict(qcfg.layer_bits).values()), key=option_order)]
        for c in (layer_grid(w, None, o, qcfg.sym) for o in options):
            for K in widths:
                check_matmulnbits(c.bits, c.group_size or K, "--format matmulnbits")


__all__ = ["ExportPlan", "ExportRequest", "ExportResult", "RESOLVERS", "TARGETS", "export", "plan_export"]
