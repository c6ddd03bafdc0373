"""QuaRot (Ashkboos et al., 2024, arXiv 2404.00456): rotate the model so activations lose their
outliers, then quantize weights (GPTQ or RTN) and activations (per token, symmetric).

Exact, calibration-free transforms (`QuaRotRotation`), as in the paper's Section 4 and its code
(spcl/QuaRot, `rotation_utils.py`):

1. Fuse every RMSNorm weight into the input columns of the linears it feeds (norm weight := 1),
   which makes RMSNorm commute with an orthogonal Q: RMSNorm(x Q) = RMSNorm(x) Q.
2. Rotate the residual stream by a random Hadamard Q = diag(s) H / sqrt(d): embedding rows
   W_emb Q; inputs of q/k/v/gate/up W Q; outputs of o/down Q^T W; the LM head W_head Q.
3. OV: a per-head Hadamard H_hd on v_proj's output rows (and bias), undone per head on o_proj's
   input columns. Every head uses the same H_hd, so this holds under GQA too.
4. Online Hadamards where no op can absorb them, folded into the weight (W' = W T) and applied to
   the input at run time by the layer (`HadamardTransform`): the full H_mlp before the down
   projection, and H_heads (x) I_hd across heads before o_proj (together with 3 this gives o_proj's
   input a full Hadamard, as the paper).

Then each block's linears are rounded in GPTQ's sequential order, the Hessians of o/down taken on
the transformed inputs; every linear input is fake-quantized per token, symmetric.

The study's run (qdlm.md 2.6) corresponds to QuantizeConfig(method="quarot", scheme="W8A8",
weight_method="gptq", mse_clip=True): per-channel symmetric GPTQ weights with the MSE clip search.

Differences from the paper / study code:
  * Only linear inputs are quantized: queries, keys and values (the KV cache) stay in high
    precision, so the online Hadamard on Q/K after RoPE is not needed and not applied.
  * The embedding is not mean-centred (QuaRot's code does it, a LayerNorm leftover that changes an
    RMSNorm model's function); here every transform is exact.
  * Dream is supported (the study's Dream QuaRot path was broken under GQA): the per-head
    Hadamard is the same matrix for every head, so kv heads shared by several query heads are fine.
  * Tied embeddings are refused: the embedding and the head would need the same rotated matrix
    with and without the final norm fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.spec import ModelSpec
from .base import QuantMethod, register_method, sequential_quantize, set_module
from .hadamard import HadamardTransform, hadamard_factorization, hadamard_transform, random_signs


class OnlineTransformLinear(nn.Linear):
    """A linear whose input is transformed online: y = T(x) W^T + b (high precision).

    It is an nn.Linear (weight, bias), so the rounding code reads it like any linear, and hooks
    on it see the pre-transform input, which is what `sequential_quantize` expects.
    """

    def __init__(self, linear: nn.Linear, transform: HadamardTransform):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta", dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.input_transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


def model_dims(model_config) -> dict[str, int]:
    """d_model, MLP width, query / kv heads and head dim of a LLaDA or Dream config."""
    dm = model_config.dims
    return {"d_model": dm.d_model, "mlp": dm.mlp_hidden, "n_heads": dm.n_heads, "n_kv": dm.n_kv_heads,
            "head_dim": dm.head_dim}


def is_tied(model_config) -> bool:
    """Whether the LM head reuses the embedding matrix (LLaDA weight_tying / Dream tie_word_embeddings)."""
    return bool(getattr(model_config, "weight_tying", False) or getattr(model_config, "tie_word_embeddings", False))


# ---- exact weight rewrites (fp64 math, written back in the parameter's dtype) ---------------------

def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()  # transposed rewrites would leave strided weights


def rows_apply(W: torch.Tensor, fn, chunk: int = 4096) -> torch.Tensor:
    """fn applied to row chunks of W in fp64, result in W's dtype: an 8B model's embedding
    (126k x 4096) would need several GB as one fp64 tensor."""
    out = torch.empty_like(W)
    for i in range(0, W.shape[0], chunk):
        out[i:i + chunk] = fn(W[i:i + chunk].double()).to(W.dtype)
    return out


def rotate_rows(W: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W Q for Q = diag(signs) H / sqrt(d), applied to each row of W [rows, d]."""
    return rows_apply(W, lambda w: hadamard_transform(w * signs[None, :]))


@torch.no_grad()
def fuse_norm(norm: nn.Module, consumers: list[nn.Linear]) -> None:
    """RMSNorm(x) * g feeding W equals RMSNorm(x) feeding W diag(g): move g into W's columns, g := 1."""
    g = norm.weight.double()
    for lin in consumers:
        _set(lin.weight, rows_apply(lin.weight.data, lambda w: w * g[None, :]))
    _set(norm.weight, torch.ones_like(g))


@torch.no_grad()
def rotate_input(lin: nn.Linear, signs: torch.Tensor) -> None:
    """W := W Q (the layer now reads the rotated residual x Q), Q = diag(signs) H / sqrt(d)."""
    _set(lin.weight, rotate_rows(lin.weight.data, signs))


@torch.no_grad()
def rotate_output(lin: nn.Linear, signs: torch.Tensor) -> None:
    """W := Q^T W, b := b Q (the layer now writes y Q into the rotated residual)."""
    _set(lin.weight, rotate_rows(lin.weight.data.T, signs).T)
    if lin.bias is not None:
        _set(lin.bias, rotate_rows(lin.bias.data[None, :], signs)[0])


def _per_head(head_dim: int):
    """Row function: x [rows, heads * hd] -> each head's slice times H_hd / sqrt(hd)."""
    return lambda w: hadamard_transform(w.reshape(w.shape[0], -1, head_dim)).reshape(w.shape)


@torch.no_grad()
def rotate_head_outputs(lin: nn.Linear, head_dim: int) -> None:
    """Output rows of each head h: W_h := H^T W_h, b_h := b_h H (so v_h becomes v_h H, H = H_hd / sqrt(hd))."""
    _set(lin.weight, rows_apply(lin.weight.data.T, _per_head(head_dim)).T)
    if lin.bias is not None:
        _set(lin.bias, rows_apply(lin.bias.data[None, :], _per_head(head_dim))[0])


@torch.no_grad()
def rotate_head_inputs(lin: nn.Linear, head_dim: int) -> None:
    """Input columns of each head h: W[:, h] := W[:, h] H (reads per-head rotated values a_h H)."""
    _set(lin.weight, rows_apply(lin.weight.data, _per_head(head_dim)))


@torch.no_grad()
def fold_online(block: nn.Module, name: str, transform: HadamardTransform) -> None:
    """W := W T and wrap the layer so it applies T to its input at run time: (x T)(W T)^T = x W^T
    for orthogonal T. The transformed input x T is what the activation quantizer then sees."""
    lin = block.get_submodule(name)
    _set(lin.weight, rows_apply(lin.weight.data, transform))
    set_module(block, name, OnlineTransformLinear(lin, transform))


class QuaRotRotation:
    """QuaRot's exact, calibration-free transforms for one model (no rounding anywhere).

    Args:
        spec: the family's ModelSpec (module names by role).
        model_config: the parsed LLaDA / Dream config (sizes, tying).
        seed: seeds the random signs of the residual Hadamard Q.
    Raises:
        InputError: tied embeddings, or a width with no Hadamard construction (naming it).
    """

    def __init__(self, spec: ModelSpec, model_config, seed: int = 0):
        if is_tied(model_config):
            raise InputError("QuaRot does not support tied embeddings (weight_tying / tie_word_embeddings): "
                             "the head needs the final norm weight fused into it, the embedding must not have it")
        self.spec = spec
        self.dims = model_dims(model_config)
        for key in ("d_model", "mlp", "head_dim"):  # fail before any work if a size has no Hadamard
            try:
                hadamard_factorization(self.dims[key])
            except InputError as e:
                raise InputError(f"QuaRot cannot rotate this model ({key} = {self.dims[key]}): {e}") from None
        try:  # the across-heads Hadamard before o_proj is optional: e.g. 6 heads have none
            hadamard_factorization(self.dims["n_heads"])
            self.across_heads = True
        except InputError:
            self.across_heads = False
        self.signs = random_signs(self.dims["d_model"], seed)

    def online_transforms(self) -> dict[str, HadamardTransform]:
        """Block-relative layer name -> the online Hadamard its input gets (o_proj's only when the
        head count has a Hadamard matrix; its per-head rotation is offline either way)."""
        d = self.dims
        out = {self.spec.linears["down"]: HadamardTransform(d["mlp"])}
        if self.across_heads:
            out[self.spec.linears["o"]] = HadamardTransform(d["n_heads"], inner=d["head_dim"])
        return out

    def embedding(self, W: torch.Tensor) -> torch.Tensor:
        """Embedding rows rotated: W_emb Q."""
        return rotate_rows(W, self.signs)

    def head(self, norm_w: torch.Tensor, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm fused into the head, head input rotated: (ones, (W_head diag(g)) Q)."""
        g = norm_w.double()
        return torch.ones_like(norm_w), rows_apply(head_w, lambda w: hadamard_transform(w * g * self.signs))

    @torch.no_grad()
    def block(self, block: nn.Module) -> None:
        """Rotate one block in place; o and down become `OnlineTransformLinear`s."""
        lin = {role: block.get_submodule(name) for role, name in self.spec.linears.items()}
        norms = {role: block.get_submodule(name) for role, name in self.spec.norms.items()}
        fuse_norm(norms["attn"], [lin["q"], lin["k"], lin["v"]])
        fuse_norm(norms["ffn"], [lin["gate"], lin["up"]])
        for role in ("q", "k", "v", "gate", "up"):
            rotate_input(lin[role], self.signs)
        for role in ("o", "down"):
            rotate_output(lin[role], self.signs)
        rotate_head_outputs(lin["v"], self.dims["head_dim"])
        rotate_head_inputs(lin["o"], self.dims["head_dim"])
        for name, transform in self.online_transforms().items():
            fold_online(block, name, transform)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Apply every exact QuaRot transform to an in-memory LLaDA / Dream model (in place; returns it).

    The logits are unchanged up to floating-point error; o and down projections become
    `OnlineTransformLinear`s carrying their online Hadamard.
    """
    spec = model.spec
    rot = QuaRotRotation(spec, model.config, seed)
    emb = model.get_submodule(spec.embedding)
    _set(emb.weight, rot.embedding(emb.weight.data))
    for block in model.blocks:
        rot.block(block)
    norm, head = model.get_submodule(spec.final_norm), model.get_submodule(spec.head)
    norm_w, head_w = rot.head(norm.weight.data, head.weight.data)
    _set(norm.weight, norm_w)
    _set(head.weight, head_w)
    return model


@register_method
class QuaRot(QuantMethod):
    """QuaRot: random-Hadamard residual rotation + online Hadamards, then GPTQ/RTN weights and
    per-token symmetric activations on every block linear input (the head input stays high precision)."""

    name = "quarot"
    default_act_sym = True  # QuaRot quantizes activations symmetrically, per token
    options = frozenset({"weight_method"})
    calibrated_transforms = False  # random Hadamard rotations: no statistics

    def __init__(self, qcfg, spec, model_config):
        super().__init__(qcfg, spec, model_config)
        self.rotation = QuaRotRotation(spec, model_config, qcfg.seed)

    def transform_embedding(self, W: torch.Tensor) -> torch.Tensor:
        return self.rotation.embedding(W)

    def transform_head(self, norm_w: torch.Tensor, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotation.head(norm_w, head_w)

    def prepare_block(self, block: nn.Module, index: int) -> None:
        self.rotation.block(block)

    def process_block(self, block: nn.Module, X: torch.Tensor, ctx: tuple, index: int) -> dict[str, dict]:
        # reuse the transforms prepare_block installed: the Hessians of o / down are conjugated by them
        transforms = {name: block.get_submodule(name).input_transform for name in self.rotation.online_transforms()}
        return sequential_quantize(self, block, X, ctx, rounding=self.qcfg.weight_method, transforms=transforms)
