"""Loading checkpoints in the released layout: names, dtypes, shards, memory, and clear errors."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dllm_export as D
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant import quantize

from .conftest import GOLDEN

GOLDEN_SHAPES = {
    "llada_mha": dict(family="llada", d_model=64, n_heads=4, n_kv_heads=4, vocab_size=128,
                      mask_token_id=120, eos_token_id=100),
    "llada_gqa": dict(family="llada", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128,
                      mask_token_id=120, eos_token_id=100),
    "dream": dict(family="dream", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  mask_token_id=120, eos_token_id=100, bos_token_id=99, pad_token_id=0),
}


def _tensor_shapes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("name", list(GOLDEN_SHAPES))
def test_factory_writes_the_released_layout(tmp_path, name):
    """The factory's config keys, values and tensor names equal what the reference save_pretrained wrote."""
    kw = dict(GOLDEN_SHAPES[name])
    ours = make_random_checkpoint(tmp_path / name, **kw)
    ref_cfg = json.loads((GOLDEN / name / "config.json").read_text())
    our_cfg = json.loads((ours / "config.json").read_text())
    # init-only fields (the released 8B config has "meta"/"mitchell"), and pa-dllm's optional
    # scheduler head, which the released checkpoints do not have
    ignore = {"init_device", "init_fn", "use_scheduler_head"}
    ref_cfg = {k: v for k, v in ref_cfg.items() if k != "use_scheduler_head"}
    assert set(our_cfg) >= set(ref_cfg)
    assert {k: v for k, v in our_cfg.items() if k in ref_cfg and k not in ignore} == \
        {k: v for k, v in ref_cfg.items() if k not in ignore}
    assert _tensor_shapes(ours) == _tensor_shapes(GOLDEN / name)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.3), ("float16", 0.05)])
def test_sharded_low_precision_checkpoints_match_fp32(tmp_path, family, dtype, tol):
    """A sharded bf16/fp16 checkpoint loads to the fp32 logits within the dtype's rounding."""
    kw = dict(family=family, vocab_size=128, seed=3)
    ref = D.load_model(make_random_checkpoint(tmp_path / "fp32", **kw))
    shard_dir = make_random_checkpoint(tmp_path / "sharded", dtype=dtype, max_shard_bytes=40_000, **kw)
    assert (shard_dir / "model.safetensors.index.json").is_file()
    assert len(list(shard_dir.glob("model-*-of-*.safetensors"))) > 2
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    want = ref(ids)
    # stored in low precision, computed in fp32: only the weight rounding differs
    got32 = D.load_model(shard_dir, dtype=torch.float32)(ids)
    assert (got32 - want).abs().max().item() <= tol
    # stored and computed in low precision
    got = D.load_model(shard_dir, dtype=dtype)(ids).float()
    assert got.dtype == torch.float32 and (got - want).abs().max().item() <= 3 * tol


def test_auto_dtype_follows_checkpoint(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", dtype="bfloat16", vocab_size=128)
    assert D.load_model(d, dtype="auto").model.transformer.wte.weight.dtype == torch.bfloat16


def test_tied_embeddings(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", family="llada", weight_tying=True, vocab_size=128)
    m = D.load_model(d)
    assert "model.transformer.ff_out.weight" not in load_file(d / "model.safetensors")
    assert m.head_weight() is m.model.transformer.wte.weight


def test_spec_ids_come_from_config_and_tokenizer(tiny_dirs):
    m = D.load_model(tiny_dirs["llada"])
    tok = D.load_tokenizer(tiny_dirs["llada"])
    assert tok.convert_ids_to_tokens([m.spec.mask_id, m.spec.eos_id, m.spec.bos_id, m.spec.eot_id]) == \
        ["<|mdm_mask|>", "<|endoftext|>", "<|startoftext|>", "<|eot_id|>"]
    g = D.load_model(GOLDEN / "dream")
    assert (g.spec.mask_id, g.spec.eos_id, g.spec.pad_id, g.spec.bos_id, g.spec.shift_logits) == (120, 100, 0, 99, True)


# ---- bad input: one clear error naming the problem -------------------------------------------------

def _corrupt(tmp_path, how):
    d = make_random_checkpoint(tmp_path / "m", vocab_size=128)
    st = d / "model.safetensors"
    cfg = json.loads((d / "config.json").read_text())
    if how == "missing_folder":
        return tmp_path / "nope", "not found"
    if how == "missing_config":
        (d / "config.json").unlink()
        return d, "missing config.json"
    if how == "missing_weights":
        st.unlink()
        return d, "no model.safetensors"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        return d, "cannot read safetensors"
    if how == "unknown_model_type":
        cfg["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))
        return d, "unknown model_type 'gpt2'"
    if how == "wrong_shape":
        t = load_file(st)
        t["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(32, 64)
        save_file(t, str(st))
        return d, "q_proj.weight has shape [32, 64]"
    if how == "missing_tensor":
        t = load_file(st)
        del t["model.transformer.ln_f.weight"]
        save_file(t, str(st))
        return d, "missing from"
    if how == "unexpected_tensor":
        t = load_file(st)
        t["model.transformer.extra.weight"] = torch.zeros(2)
        save_file(t, str(st))
        return d, "unexpected tensors"
    if how == "missing_shard":
        t = load_file(st)
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in t}}))
        return d, "missing safetensors shard"
    if how == "unsupported_flag":
        cfg["block_type"] = "sequential"
        (d / "config.json").write_text(json.dumps(cfg))
        return d, "unsupported LLaDA config: block_type"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_folder", "missing_config", "missing_weights", "truncated",
                                 "unknown_model_type", "wrong_shape", "missing_tensor", "unexpected_tensor",
                                 "missing_shard", "unsupported_flag"])
def test_bad_checkpoints_raise_clear_errors(tmp_path, how):
    path, message = _corrupt(tmp_path, how)
    with pytest.raises(D.CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        D.load_model(path)


def test_write_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves no folder behind."""
    from dllm_export.models import checkpoint

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError):
        make_random_checkpoint(tmp_path / "m", vocab_size=128)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("call, message", [
    (lambda: D.load_model(5), "a model is a folder path or a bundled name (default, default-dream), got 5"),
    (lambda: D.load_backend(None), "a model is a folder path or a bundled name"),
    (lambda: D.load_tokenizer(["default"]), "a model is a folder path or a bundled name"),
    (lambda: D.export(None, "unused"), "a model is a folder path or a bundled name"),
    (lambda: D.export("default", None), "an output folder is a path, got None"),
    (lambda: quantize("default", "unused", "gptq"), "qcfg must be a QuantizeConfig, got str"),
    # load_backend: threads a runtime can take, options the backend reads (torch dropped them silently;
    # llama.cpp's constructor raised a TypeError on a string thread count or an unknown option)
    (lambda: D.load_backend("default", threads="2"), "threads must be an integer >= 0 (0: one per physical core)"),
    (lambda: D.load_backend("default", threads=10**6), "1000000 threads on"),
    (lambda: D.load_backend("default", max_tokens=512), "backend option(s) max_tokens: the torch backend takes none"),
])
def test_api_arguments_of_the_wrong_kind(call, message):
    """A path or config argument of the wrong kind is an InputError naming it (it was a TypeError
    from pathlib, or an AttributeError from inside the quantizer)."""
    with pytest.raises(D.InputError, match=re.escape(message)):
        call()


def test_a_folder_filled_meanwhile_by_another_run_is_kept(tmp_path):
    """Two runs writing one output: the first to finish keeps it; the second's rename found it not
    empty ("Directory not empty", exit 1) and now says what happened, leaving its temp folder nowhere."""
    from dllm_export.fileio import atomic_folder

    out = tmp_path / "art"
    with pytest.raises(D.InputError, match=f"output folder {out} was filled by another run while this one worked"):
        with atomic_folder(out) as stage:
            (stage / "model.onnx").write_text("ours")
            out.mkdir()
            (out / "model.onnx").write_text("theirs")  # the other run finished first
    assert os.listdir(tmp_path) == ["art"] and (out / "model.onnx").read_text() == "theirs"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_spec_names_the_roles_factory_and_train_use(family):
    """Norms, residual outputs, the GGUF rope permutation and the ELBO estimator are spec data, so a
    new family is its own file plus a registry row (no family names in factory / train / exporters)."""
    from dllm_export.models import FAMILIES
    from dllm_export.models.factory import CONFIGS
    from dllm_export.models.loader import build_model

    spec = FAMILIES[family].spec
    names = [n for n, _ in build_model(CONFIGS[family](), device="meta").named_parameters()]
    norms = [n for n in names if spec.is_norm(n)]
    assert norms == [n for n in names if n.endswith(("norm.weight", "ln_f.weight"))] and len(norms) == 2 * 2 + 1
    outs = [n for n in names if spec.is_residual_out(n)]
    assert len(outs) == 2 * 2 and all(n.startswith(spec.blocks) for n in outs)
    assert (spec.gguf_rope_permute, spec.elbo_estimator) == {"llada": (True, "llada"), "dream": (False, "dream")}[family]


@pytest.mark.parametrize("device, message", [("gpu0", "unknown device 'gpu0'"),
                                             ("cuda:7", "device 'cuda:7': ")])
def test_devices_this_machine_lacks_are_refused(device, message, tiny_dirs, tmp_path):
    """A CUDA device on a CPU build died inside safetensors' reader (load) or as an AssertionError
    traceback (quantize); now one line naming the device, before any file is read."""
    from dllm_export.errors import InputError
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    with pytest.raises(InputError, match=message):
        D.load_model(tiny_dirs["llada"], device=device)
    with pytest.raises(InputError, match=message):
        quantize(tiny_dirs["llada"], tmp_path / "q", QuantizeConfig(method="rtn", calib=CalibConfig(n_samples=1,
                                                                                                   seq_len=8)),
                 device=device, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel="fast"), "unknown kernel 'fast'"),  # a float checkpoint ignored it: a misspelt name passed
    (dict(dtype=torch.int8), "compute dtype must be a float one"),  # failed deep in the parameters
])
def test_load_model_refuses_what_it_cannot_use(kwargs, message):
    import dllm_export as D

    with pytest.raises(D.DllmExportError, match=message):
        D.load_model("default", **kwargs)
