"""Tokenizers load offline from the checkpoint folder, with the released chat templates."""

import json

import pytest

import dllm_export as D
from dllm_export.tokenizer import encode_prompt


def test_llada_chat_template_is_the_released_one(tiny_dirs):
    tok = D.load_tokenizer(tiny_dirs["llada"])
    text = tok.apply_chat_template([{"role": "user", "content": " Hi there \n"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_dream_chat_template_is_the_released_one(tiny_dirs):
    tok = D.load_tokenizer(tiny_dirs["dream"])
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_round_trip_and_special_tokens_are_single_ids(tiny_dirs, name):
    tok = D.load_tokenizer(tiny_dirs[name])
    model = D.load_model(tiny_dirs[name])
    text = "def fibonacci(n):\n    return 47+385"
    ids = encode_prompt(tok, text)
    assert tok.decode(ids) == text
    assert "4" in tok.convert_ids_to_tokens(ids) and "7" in tok.convert_ids_to_tokens(ids)  # digits split
    chat = encode_prompt(tok, "x", chat=True)
    assert model.spec.eot_id in chat and model.spec.mask_id not in chat


def test_dream_vocab_and_merges_layout(tiny_dirs, tmp_path):
    """Dream ships vocab.json + merges.txt (a Qwen2 BPE) instead of tokenizer.json."""
    import shutil

    src = tiny_dirs["dream"]
    dst = tmp_path / "dream"
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    (dst / "tokenizer.json").unlink()
    (dst / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(t["id"]): {"content": t["content"], "special": True} for t in tj["added_tokens"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, tok = D.load_tokenizer(src), D.load_tokenizer(dst)
    text = "<|im_start|>user\nclass Stack:\n    x = 12+34<|im_end|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]


def test_missing_tokenizer(tmp_path):
    from dllm_export.models.factory import make_random_checkpoint

    d = make_random_checkpoint(tmp_path / "m", vocab_size=128)
    with pytest.raises(D.CheckpointError, match="no tokenizer.json"):
        D.load_tokenizer(d)
