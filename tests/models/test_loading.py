"""Loading a checkpoint folder: the loaded model equals HF, and every broken folder gives a clear CheckpointError
that names what is wrong (nothing loads silently with random or dropped weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from modality_circuits import HookedMLLM
from modality_circuits.errors import CheckpointError
from modality_circuits.models.loading import resolve_device, resolve_dtype
from modality_circuits.testing import tiny_llava


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    hf = tiny_llava(tokenizer, n_layers=3, text_overrides={"tie_word_embeddings": True})
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, hf


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder[0], dst)
    return dst


def test_loaded_tied_checkpoint_equals_hf(folder, prompts):
    path, hf = folder
    model = HookedMLLM.from_pretrained(path)
    assert model.unembed.W_U.data_ptr() == model.embed.W_E.data_ptr()
    batch = model.prepare(prompts)
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos,
                 **batch.model_inputs).logits
        ours = model(batch)
    m = batch.attention_mask.bool()
    assert float((ours[m] - ref[m]).abs().max()) < 1e-4


@pytest.mark.parametrize("n_layers,kind", [(2, "unexpected_keys"), (4, "missing_keys")])
def test_config_layer_count_disagreeing_with_weights_is_refused(folder, tmp_path, n_layers, kind):
    path = _copy(folder, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = n_layers
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"disagree: {kind} \(\d+\): .*layers\.\d"):
        HookedMLLM.from_pretrained(path)


def test_invalid_config_json_names_file_and_line(folder, tmp_path):
    path = _copy(folder, tmp_path)
    (path / "config.json").write_text('{\n  "architectures": ["LlavaForConditionalGeneration"],\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config\.json \(the model config\) is not valid JSON: .* line 3"):
        HookedMLLM.from_pretrained(path)


def test_truncated_safetensors_is_refused(folder, tmp_path):
    path = _copy(folder, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        HookedMLLM.from_pretrained(path)


def test_tokenizer_config_without_tokenizer_file_is_refused(folder, tmp_path):
    path = _copy(folder, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json but no tokenizer file"):
        HookedMLLM.from_pretrained(path)


@pytest.mark.parametrize("content,pattern", [
    ('{"system": "", "user_prefix": "USER: ",', r"prompt_template\.json \(the prompt layout\) is not valid JSON"),
    ('{"sytem": ""}', r"unknown fields \['sytem'\]"),
    ('{"system": 3}', r"non-string fields \['system'\]"),
    ('["USER: "]', r"must hold a JSON object"),
])
def test_malformed_prompt_template_is_refused(folder, tmp_path, content, pattern):
    path = _copy(folder, tmp_path)
    (path / "prompt_template.json").write_text(content)
    with pytest.raises(CheckpointError, match=pattern):
        HookedMLLM.from_pretrained(path)


@pytest.mark.parametrize("device,pattern", [("gpu", "Unknown device 'gpu'"), ("cuda:0", "CUDA is not available"),
                                            ("xla", "not supported|Unknown device")])
def test_unknown_or_missing_device_is_refused(device, pattern):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(CheckpointError, match=pattern):
        resolve_device(device)


def test_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        resolve_dtype("bf16")
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        resolve_dtype(torch.int8)


def test_bfloat16_loads_directly_in_bfloat16(folder):
    model = HookedMLLM.from_pretrained(folder[0], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cfg.dtype == torch.bfloat16


def test_in_place_edits_never_reach_the_checkpoint_file(folder):
    """from_pretrained's parameters share the loaded (memory-mapped) tensors: editing them is private."""
    import hashlib

    path = folder[0] / "model.safetensors"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = HookedMLLM.from_pretrained(folder[0])
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(1.0)
        model.blocks[1].mlp.W_in.mul_(0.0)
    assert float(model.blocks[1].mlp.W_in.detach().abs().sum()) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_from_hf_does_not_alias_the_callers_model(folder):
    _, hf = folder
    model = HookedMLLM.from_hf(hf, HookedMLLM.from_pretrained(folder[0]).tokenizer)
    q = hf.model.language_model.layers[0].self_attn.q_proj.weight
    before = q.clone()
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(1.0)
    assert torch.equal(q, before)
    assert model.blocks[0].attn.W_Q.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
