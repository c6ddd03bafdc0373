"""GGUF tokenizer parity: llama.cpp (vocab-only load of the written file) tokenizes like the
checkpoint's own tokenizer, for the bundled tokenizers and for byte-level BPEs built here with the
other pre-tokenizer regexes llama.cpp knows; the pre-tokenizer is found by search when its regex
is not in the table; a tokenizer no llama.cpp pre-tokenizer reproduces is refused, nothing written."""

import json
import shutil

import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from dllm_export.cli import main  # noqa: E402
from dllm_export.errors import CheckpointError  # noqa: E402
from dllm_export.exporter import gguf_vocab  # noqa: E402
from dllm_export.exporter.gguf import GgufExportConfig, export_gguf  # noqa: E402
from dllm_export.models import FAMILIES  # noqa: E402
from dllm_export.models.factory import make_random_checkpoint  # noqa: E402
from dllm_export.models.loader import read_spec, resolve_model_path  # noqa: E402
from dllm_export.tokenizer import SAMPLE_TEXT, load_tokenizer  # noqa: E402

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# text the check text does not contain: the two lines, the training text, more digits and scripts
OTHER_TEXT = ("def f(a,b):\n    return a+b  # 12345\n" + SAMPLE_TEXT +
              "x = {'k': [1, 22, 333, 4444]};; y->z  \t\t 98765432 Ünïcödé ünd 東京 مرحبا 🙂🙂\n")
F32 = GgufExportConfig(quant="F32", embed_type="F32", head_type="F32")


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers as P

    byte_level = P.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "llama3": P.Sequence([P.Split(Regex(LLAMA3), behavior="isolated"), byte_level]),  # digits 1-3
        "gpt2": P.ByteLevel(add_prefix_space=False, use_regex=True),  # GPT-2's regex, the common recipe
        # letters in pairs: no llama.cpp pre-tokenizer splits like this
        "pairs": P.Sequence([P.Split(Regex(r"\p{L}{1,2}|[^\p{L}]"), behavior="isolated"), byte_level]),
    }[kind]


def _with_tokenizer(base, out, kind: str):
    """A copy of checkpoint `base` whose tokenizer.json is a byte-level BPE trained here with
    pre-tokenizer `kind`, special tokens first (at the config's ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(dict.fromkeys(FAMILIES["llada"].spec.special_tokens.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT, gguf_vocab.CHECK_TEXT], trainer=trainer)
    shutil.copytree(base, out)
    (out / "tokenizer.json").write_text(tok.to_str())
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("tok") / "llada", family="llada", tokenizer=True,
                                  vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128)


def _llama_ids(gguf_file, text):
    return gguf_vocab.read_back(gguf_file, text)["ids"]


def _assert_parity(art, src, text=OTHER_TEXT):
    want = load_tokenizer(src)(text, add_special_tokens=False)["input_ids"]
    got = _llama_ids(art / "model.gguf", text)
    assert got == want, (len(got), len(want))


@pytest.mark.parametrize("model", ["default", "default-dream"])
def test_bundled_tokenizers_match_llamacpp(model, tmp_path):
    art = export_gguf(model, tmp_path / "art", GgufExportConfig(quant="F16"))
    parity = json.loads((art / "manifest.json").read_text())["tokenizer_parity"]
    assert parity["pre_tokenizer"] == "qwen2" and parity["found_by"] == "regex"
    assert parity["check_tokens"] > 300 and parity["add_bos"] is False and parity["chat_template"] is True
    _, spec, _ = read_spec(resolve_model_path(model))
    assert parity["special_ids"]["mask"] == spec.mask_id and parity["special_ids"]["eos"] == spec.eos_id
    _assert_parity(art, resolve_model_path(model))


# (tokenizer kind, pre-tokenizer written, how it was found)
KINDS = [("llama3", "llama-bpe", "regex"), ("gpt2", "gpt-2", "search")]


@pytest.mark.parametrize("kind,pre,how", KINDS, ids=[k for k, _, _ in KINDS])
def test_other_regexes_llamacpp_knows(kind, pre, how, base, tmp_path):
    src = _with_tokenizer(base, tmp_path / "src", kind)
    art = export_gguf(src, tmp_path / "art", F32)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["pre_tokenizer"] == pre and manifest["tokenizer_parity"]["found_by"] == how
    _assert_parity(art, src)
    # without the name (llama.cpp's `default`) the same vocabulary tokenizes differently
    from dllm_export.exporter.gguf import _write_metadata, open_source, write_gguf

    opened, vocab = open_source(src), gguf_vocab.read_vocab(src, 384)
    write_gguf(tmp_path / "default.gguf", opened.spec.gguf_arch, [], None,
               lambda w: _write_metadata(w, opened.spec, opened.dims, {**vocab, "pre": "default"}, "F32"))
    want = load_tokenizer(src)(OTHER_TEXT, add_special_tokens=False)["input_ids"]
    assert _llama_ids(tmp_path / "default.gguf", OTHER_TEXT) != want


def test_unmatched_pre_tokenizer_is_refused(base, tmp_path, capsys, monkeypatch):
    src = _with_tokenizer(base, tmp_path / "src", "pairs")
    with pytest.raises(CheckpointError, match="none of the .* pre-tokenizers llama.cpp knows"):
        export_gguf(src, tmp_path / "art", F32)
    assert main(["--model", str(src), "--target", "gguf", "--quant", "F32", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "tokenizes like this tokenizer" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no artifact, no temporary folder
    # with a PTQ grid to calibrate first: refused before any calibration runs
    import dllm_export.quant

    monkeypatch.setattr(dllm_export.quant, "quantize", lambda *a, **k: pytest.fail("calibrated first"))
    assert main(["--model", str(src), "--target", "gguf", "--bits", "4", "--method", "gptq",
                 "--out", str(tmp_path / "ptq")]) == 2
    assert "tokenizes like this tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_without_llamacpp_only_a_known_regex_is_written(base, tmp_path, monkeypatch):
    import dllm_export.exporter.gguf as G

    monkeypatch.setattr(G, "llama_cpp_version", lambda: None)
    art = export_gguf(base, tmp_path / "art", F32)
    parity = json.loads((art / "manifest.json").read_text())["tokenizer_parity"]
    assert parity["checked_with"] is None and parity["pre_tokenizer"] == "qwen2"
    with pytest.raises(CheckpointError, match="install llama-cpp-python"):
        export_gguf(_with_tokenizer(base, tmp_path / "src", "gpt2"), tmp_path / "art2", F32)
    assert not (tmp_path / "art2").exists()


def test_special_ids_read_back_are_checked():
    got = {"ids": [1, 2], "bos": 0, "eos": 7, "pad": 1, "mask": -1, "eot": 3, "add_bos": True, "chat_template": "x"}
    want = {"ids": [1, 3], "special_ids": {"eos": 1, "mask": 2}, "add_bos": False, "chat_template": "x"}
    diff = gguf_vocab.differences(got, want)
    assert diff == ["the check text gives 2 tokens in llama.cpp and 2 with the checkpoint's tokenizer (first "
                    "difference at token 1)", "llama.cpp reads eos id 7, the checkpoint has 1",
                    "llama.cpp reads mask id -1, the checkpoint has 2", "llama.cpp reads add_bos True, written False"]
