"""llama.cpp backend of the unmasking loop (llama-cpp-python's low-level bindings).

llama.cpp runs the `llada` / `dream` architectures without a KV cache: every `llama_decode`
takes the non-causal encoder path and returns logits for every token of the batch, provided
the whole batch fits one micro-batch (n_ubatch). That condition is a hard abort inside
llama.cpp, so it is checked here before each call. Several sequences share one call (distinct
seq ids never attend to each other); left padding is dropped, which leaves every real token's
attention unchanged (RoPE depends on relative positions only).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..formats import check_format_version
from ..interrupts import kept_interrupts
from ..models.layers import check_ids
from ..models.loader import read_spec
from ..targets import physical_cores

def _set_verbose(verbose: bool) -> None:
    """llama-cpp-python's own log hook: errors only unless verbose (its callback is installed at import)."""
    from llama_cpp import _logger

    _logger.set_verbose(verbose)


def load_cpu_variants(L) -> Path | None:
    """Load the CPU backends of a llama.cpp build with ggml's run-time CPU variants
    (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: one libggml-cpu-<arch>.so per ISA level, and ggml
    loads the best one this CPU scores). ggml looks for them only beside the executable and in
    the working directory, while the wheel puts them in site-packages/bin, so they are loaded
    from there before llama_backend_init. Returns that folder, or None for a build with one CPU
    backend compiled in (llama-cpp-python's default)."""
    lib = Path(L.llama_cpp._base_path)
    ggml = L.llama_cpp._lib  # dlsym through libllama reaches the libggml it loaded (the files are copies)
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count():
        return None
    for folder in (lib, lib.parents[1] / "bin"):
        if any(folder.glob("libggml-cpu-*.so")):
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(folder).encode())
            return folder
    return None


def gguf_file(path: str | Path) -> Path:
    """The .gguf file of an artifact folder (model.gguf) or the file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.gguf"
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {p}")
    return p


class LlamaCppBackend:
    """`forward(ids, attention_mask) -> logits` through llama.cpp.

    Args:
        path: an artifact folder from `exporter.gguf` (model.gguf + config.json + tokenizer) or a
            .gguf file inside one.
        threads: CPU threads (0 = one per physical core this process may run on).
        max_tokens: tokens per llama_decode call (n_batch = n_ubatch); default the model's context.
        max_seqs: sequences per call.
        flash_attn: llama.cpp's flash attention (faster; keeps K/V in F16, so logits move by ~1e-3
            relative). Off by default: the F32 path reproduces our logits to float noise.
        verbose: keep llama.cpp's own logging on stderr.
    """

    name = "llama.cpp"
    supports_cache = False  # llama.cpp keeps its own KV cache; the loop's block caches are not wired in
    supports_rows = False
    own_threads = True  # ggml's threads

    def __init__(self, path: str | Path, threads: int = 0, max_tokens: int | None = None, max_seqs: int = 32,
                 flash_attn: bool = False, verbose: bool = False):
        try:
            import llama_cpp as L
        except ImportError as e:
            raise InputError(f"the llama.cpp backend needs llama-cpp-python: {e}") from None
        self.L = L
        file = gguf_file(path)
        folder = file.parent
        manifest = folder / "manifest.json"  # a bare .gguf (llama.cpp's own) has none
        try:
            self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        except ValueError as e:
            raise CheckpointError(f"{manifest}: unreadable ({e})") from None
        if not isinstance(self.manifest, dict):
            raise CheckpointError(f"{manifest}: not a dllm-export manifest")
        if self.manifest:
            check_format_version(self.manifest, manifest)
        _, self.spec, dims = read_spec(folder)
        self.vocab_size = dims.vocab_rows
        self.max_length = dims.context
        self.max_tokens = int(max_tokens or dims.context)
        self.max_seqs = max_seqs = min(max_seqs, self.max_tokens)  # a sequence has at least one token
        _set_verbose(verbose)
        with kept_interrupts():  # llama.cpp logs through a Python callback that would swallow Ctrl-C
            load_cpu_variants(L)
            L.llama_backend_init()
            self.cpu_features = L.llama_print_system_info().decode().strip()  # the CPU variant in use
            self.model = L.llama_model_load_from_file(str(file).encode(), L.llama_model_default_params())
        if not self.model:
            raise CheckpointError(f"llama.cpp could not load {file}")
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        if n_vocab != dims.vocab_rows:
            raise CheckpointError(f"{file}: llama.cpp sees {n_vocab} tokens, config.json implies {dims.vocab_rows}")
        cp = L.llama_context_default_params()
        # no KV cache exists for these archs: n_ctx only bounds one call, like n_ubatch; llama.cpp
        # wants at least 256 positions per sequence slot and n_ctx divisible by n_seq_max
        cp.n_batch = cp.n_ubatch = cp.n_outputs_max = self.max_tokens
        cp.n_ctx = max(self.max_tokens, 256 * max_seqs) // max_seqs * max_seqs
        cp.n_seq_max = max_seqs
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # llama.cpp's own default is 4 threads whatever the host: on 2 cores its spinning threads then
        # take 1.7x longer a step (bundled model); one per core this process may run on
        self.threads = threads or physical_cores()
        cp.n_threads = cp.n_threads_batch = self.threads
        with kept_interrupts():
            self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise CheckpointError(f"llama.cpp could not create a context for {file}")
        self.batch = L.llama_batch_init(self.max_tokens, 0, max_seqs)
        self.path = file

    def _decode(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """One llama_decode over several sequences; returns each one's logits [n_i, V]."""
        L, b = self.L, self.batch
        n = sum(len(r) for r in rows)
        if n > self.max_tokens:  # llama.cpp would abort the process (GGML_ASSERT n_ubatch >= n_tokens)
            raise InputError(f"{n} tokens in one call exceed n_ubatch = {self.max_tokens}")
        i = 0
        for s, row in enumerate(rows):
            for pos, tok in enumerate(row.tolist()):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s
                b.logits[i] = 1
                i += 1
        b.n_tokens = n
        with kept_interrupts():  # a warning logged mid-decode must not swallow Ctrl-C
            rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise CheckpointError(f"llama_decode failed with code {rc}")
        logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n, self.vocab_size)).copy()
        out, start = [], 0
        for row in rows:
            out.append(logits[start:start + len(row)])
            start += len(row)
        return out

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits [B, L, V] (float32); rows of left padding come back as zeros."""
        check_ids(ids, self.vocab_size, attention_mask=attention_mask)  # the length: n_ubatch, below
        ids_np = ids.to(torch.int64).cpu().numpy()
        B, T = ids_np.shape
        if T > self.max_tokens:
            raise InputError(f"sequence of {T} tokens exceeds n_ubatch = {self.max_tokens} (pass max_tokens)")
        keep = np.ones_like(ids_np, dtype=bool) if attention_mask is None else attention_mask.cpu().numpy() != 0
        out = np.zeros((B, T, self.vocab_size), dtype=np.float32)
        pending: list[int] = []

        def flush():
            rows = [ids_np[r][keep[r]] for r in pending]
            for r, lg in zip(pending, self._decode(rows)):
                out[r, keep[r]] = lg
            pending.clear()

        lengths = keep.sum(1).tolist()
        queued = 0
        for r in range(B):  # pack sequences into calls of at most max_tokens tokens / max_seqs sequences
            if pending and (queued + lengths[r] > self.max_tokens or len(pending) == self.max_seqs):
                flush()
                queued = 0
            pending.append(r)
            queued += lengths[r]
        if pending:
            flush()
        return torch.from_numpy(out)

    def close(self) -> None:
        """Free the llama.cpp context, batch and model (also done at garbage collection)."""
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
