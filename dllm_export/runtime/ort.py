"""onnxruntime backend of the unmasking loop: runs an artifact written by `exporter.onnx`."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..formats import check_format_version
from ..models.layers import check_ids
from ..models.loader import read_spec


def read_onnx_manifest(path: Path) -> dict:
    """manifest.json of an ONNX artifact folder, checked for its format tag."""
    from ..exporter.onnx import FORMAT

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ONNX manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'manifest.json'} is not a dllm-export ONNX manifest")
    check_format_version(manifest, path / "manifest.json")
    return manifest


def ort_op_times(events: list[dict], skip_runs: int = 0) -> dict[str, list]:
    """{op type: [ms, calls]} of the kernels in onnxruntime profiler `events` (its JSON trace),
    counting the session runs after the first `skip_runs`."""
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[skip_runs] if skip_runs < len(runs) else float("inf")
    ops: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            t = ops.setdefault(e["args"]["op_name"], [0.0, 0])
            t[0] += e["dur"] / 1000
            t[1] += 1
    return ops


class OrtBackend:
    """`forward(ids, attention_mask) -> logits` through an onnxruntime InferenceSession.

    Args:
        path: artifact folder (model.onnx, model.onnx.data, config.json, manifest.json, tokenizer).
        threads: intra-op threads (0 = onnxruntime's default).
        providers: execution providers (default: CUDA when available, then CPU).
        accuracy_level: override the manifest's MatMulNBits accuracy level for QDQ-fused nodes.
        optimize: False runs the graph as written (ORT_DISABLE_ALL), an oracle for fusion bugs.
        spinning: intra-op threads spin while idle (None = the device profile's, else onnxruntime's: on).
    """

    name = "onnxruntime"
    supports_rows = True
    supports_cache = False  # True for a block-step graph (set at load)
    own_threads = True  # onnxruntime's intra-op pool

    def __init__(self, path: str | Path, threads: int = 0, providers: list[str] | None = None,
                 accuracy_level: int | None = None, optimize: bool = True, spinning: bool | None = None):
        import onnxruntime as ort

        from ..exporter.onnx import MODEL_FILE

        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"no {MODEL_FILE} in {path}")
        self.manifest = read_onnx_manifest(path)
        _, self.spec, dims = read_spec(path)
        self.vocab_size = dims.vocab_rows
        self.max_length = dims.context
        self.config_entries = dict(self.manifest.get("session_options", {}))
        if accuracy_level is not None:
            self.config_entries["session.qdq_matmulnbits_accuracy_level"] = str(accuracy_level)
        device = self.manifest.get("device") or {}
        self._threads = threads or device.get("threads", 0)
        self._spinning = device.get("spinning", True) if spinning is None else spinning
        self._optimize = optimize
        if providers is None:  # the device profile's, else CUDA when present, then CPU
            available = ort.get_available_providers()
            wanted = device.get("providers") or ("CUDAExecutionProvider", "CPUExecutionProvider")
            providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.providers = providers
        self.path = path
        self.session = self._new_session()
        self.runs = 0  # session runs (forwards) so far
        names = {i.name for i in self.session.get_inputs()}
        self.has_positions = "logit_positions" in names
        self.supports_cache = "window_start" in names  # the block-step graph (exporter.onnx kv_cache)
        self.n_layers = dims.n_layers
        self.kv_shape = (dims.n_kv_heads, dims.head_dim)

    def _new_session(self, profile_prefix: str | None = None):
        """An InferenceSession of the artifact with this backend's options (and onnxruntime's
        profiler on, writing under `profile_prefix`, when given)."""
        import onnxruntime as ort

        from ..exporter.onnx import MODEL_FILE

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        if not self._spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in self.config_entries.items():
            opts.add_session_config_entry(key, value)
        if not self._optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        try:
            return ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException types
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path / MODEL_FILE}: onnxruntime cannot load the graph or its weights "
                                  f"({detail}); run dllm-export verify {self.path}") from None

    def op_profile(self, fn) -> dict:
        """Where `fn()` (which calls `forward`) spends onnxruntime's time: {"wall_ms", "ops": {op type:
        [ms, calls]}} of its second call (the first pays first-run costs), from onnxruntime's profiler.
        The session is rebuilt with the profiler on (the old one released first, so one copy of the
        weights is held) and kept after, its profiler ended. The profiler adds a few percent per node:
        read the shares, and the backend's own timings for speed."""
        with tempfile.TemporaryDirectory() as d:
            self.session = None
            self.session = self._new_session(str(Path(d) / "ort"))
            try:
                before = self.runs
                fn()
                warm = self.runs - before
                t0 = time.perf_counter()
                fn()
                wall_ms = 1000 * (time.perf_counter() - t0)
            finally:
                trace = self.session.end_profiling()  # later runs are not profiled
            events = json.loads(Path(trace).read_text())
        return {"wall_ms": wall_ms, "ops": ort_op_times(events, skip_runs=warm)}

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw logits [B, L, V] (or [B, P, V] for `positions` [B, P]) as a float32 tensor. `rows` =
        (start, end): only those positions (the head runs on them alone when the graph has
        `logit_positions`, else the full output is sliced).

        With a `KVCache` (models.layers): a full forward (window None, or a window with `fill`:
        those columns alone, an empty past) stores every layer's present keys/values; a windowed
        one (ids = the window's tokens) feeds them as the past, and with `update` stores the
        window's fresh ones (the present's last rows) over them.
        """
        window = None if cache is None else cache.window
        fill = cache is not None and cache.fill and window is not None
        check_ids(ids, self.vocab_size, self.max_length, attention_mask if window is None else None)
        ids_np = ids.to(torch.int64).cpu().numpy()
        B, W = ids_np.shape
        T = W if window is None else cache.length
        mask = np.ones((B, T), np.int64) if attention_mask is None else attention_mask.to(torch.int64).cpu().numpy()
        feed = {"input_ids": ids_np, "attention_mask": mask}
        if rows is not None and self.has_positions and positions is None:
            positions, rows = torch.arange(rows[0], rows[1]).expand(B, -1), None
        if self.has_positions:
            if positions is None:
                positions = torch.arange(W).expand(B, -1)
            feed["logit_positions"] = positions.to(torch.int64).cpu().numpy()
        elif positions is not None:
            raise CheckpointError(f"{self.path}: exported without the logit_positions input")
        outputs = ["logits"]
        if self.supports_cache:
            feed["window_start"] = np.array([0 if window is None else window[0]], np.int64)
            empty = np.zeros((B, *self.kv_shape[:1], 0, self.kv_shape[1]), np.float32)
            for i in range(self.n_layers):
                feed[f"past.{i}.key"] = empty if window is None or fill else cache.k[i]
                feed[f"past.{i}.value"] = empty if window is None or fill else cache.v[i]
            if cache is not None and (window is None or fill or cache.update):
                outputs += [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        elif cache is not None:
            raise CheckpointError(f"{self.path}: exported without the kv_cache inputs (re-export to use caches)")
        out = self.session.run(outputs, feed)
        self.runs += 1
        if len(out) > 1 and window is not None and not fill:  # the present = [past, the window's fresh rows]
            s, e = window

            def splice(cached: list, present: list) -> list:
                return [np.concatenate([c[:, :, :s], p[:, :, T:], c[:, :, e:]], axis=2)
                        for c, p in zip(cached, present)]

            cache.k, cache.v = splice(cache.k, out[1::2]), splice(cache.v, out[2::2])
        elif len(out) > 1:  # a full forward refreshes the cache
            cache.k, cache.v, cache.length = out[1::2], out[2::2], cache.length if fill else W
        logits = torch.from_numpy(out[0])
        return logits if rows is None else logits[:, rows[0]:rows[1]]

    def optimized_op_types(self) -> dict[str, int]:
        """Op histogram of the graph onnxruntime actually runs (after its fusions), for checks."""
        import onnx
        import onnxruntime as ort

        from ..exporter.onnx import MODEL_FILE

        with tempfile.TemporaryDirectory() as d:
            opts = ort.SessionOptions()
            for key, value in self.config_entries.items():
                opts.add_session_config_entry(key, value)
            opts.optimized_model_filepath = str(Path(d) / "optimized.onnx")
            opts.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
            m = onnx.load(str(Path(d) / "optimized.onnx"), load_external_data=False)
            counts: dict[str, int] = {}
            for n in m.graph.node:
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
            return counts
