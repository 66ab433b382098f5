"""TransformerLens machinery on HookedMLLM (cache, hooks, partial forwards, weight folding) and bad input.

Every bad-input case asserts the exception type *and* a fragment of its message, so the messages stay
helpful (they say what is wrong and how to fix it).
"""

from __future__ import annotations

import json

import pytest
import torch

from modality_circuits import HookedMLLM, ModalityCircuitsError, Segment
from modality_circuits.errors import (
    CheckpointError,
    ImageTokenMismatchError,
    NumericalError,
    SpanError,
    UnsupportedArchitectureError,
)
from modality_circuits.models import adapter_for
from modality_circuits.models.decoders import decoder_spec
from modality_circuits.prompts import split_placeholders


def assert_no_hooks(model: HookedMLLM) -> None:
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks and not hp._backward_hooks, f"hook left on {name}"
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook handle left on {name}"


@pytest.fixture(scope="module")
def clean_logits(model, batch):
    with torch.no_grad():
        return model(batch)


# ----------------------------------------------------------------------------------------------------- cache
def test_run_with_cache_equals_forward(model, batch, clean_logits):
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch)
    assert torch.equal(logits, clean_logits)
    B, P = batch.tokens.shape
    cfg = model.cfg
    n_img_tok = int(batch.spans.mask("image").sum())
    expected = {
        "hook_embed": (B, P, cfg.d_model),
        "hook_image_embeds": (n_img_tok, cfg.d_model),
        "blocks.0.hook_resid_pre": (B, P, cfg.d_model),
        "blocks.0.attn.hook_attn_scores": (B, cfg.n_heads, P, P),
        "blocks.0.attn.hook_pattern": (B, cfg.n_heads, P, P),
        "blocks.0.attn.hook_z": (B, P, cfg.n_heads, cfg.d_head),
        "blocks.1.hook_mlp_out": (B, P, cfg.d_model),
        "blocks.1.hook_resid_post": (B, P, cfg.d_model),
        "ln_final.hook_normalized": (B, P, cfg.d_model),
    }
    for name, shape in expected.items():
        assert name in cache, name
        assert tuple(cache[name].shape) == shape, name
    # attention never looks at padding, and rows sum to one
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
    real = batch.attention_mask.bool()
    assert (~real).any()
    rows = pattern.sum(-1).permute(0, 2, 1)[real]  # [real q, head]
    assert (rows - 1).abs().max() < 1e-5
    leak = (pattern * (~real)[:, None, None, :]).sum(-1).permute(0, 2, 1)[real]
    assert leak.abs().max() == 0
    # the residual stream holds the image features at image positions and token embeddings elsewhere
    img = batch.spans.mask("image", allow_empty=True)
    resid = cache["blocks.0.hook_resid_pre"]
    assert torch.equal(resid[img], cache["hook_image_embeds"])
    assert torch.equal(resid[~img], cache["hook_embed"][~img])
    with torch.no_grad():
        feats = model.image_encoder.encode_images(**batch.model_inputs)
    assert torch.equal(cache["hook_image_embeds"], feats)
    assert_no_hooks(model)


def test_final_residual_gives_logits(model, batch, clean_logits):
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n == last)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    with torch.no_grad():
        logits = model.unembed(model.ln_final(resid))
    assert torch.allclose(logits, clean_logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- hooks
def test_zeroing_image_embeds_equals_hf_with_zero_features(model, hf_model, batch, helpers):
    def zero(x, hook):
        return torch.zeros_like(x)

    with torch.no_grad():
        ours = model.run_with_hooks(batch, fwd_hooks=[("hook_image_embeds", zero)])
        img = batch.tokens == hf_model.config.image_token_id
        embeds = hf_model.get_input_embeddings()(batch.tokens).masked_fill(img[..., None], 0.0)
        ref = hf_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                       position_ids=helpers.hf_position_ids(batch.attention_mask)).logits
        clean = helpers.hf_logits(hf_model, batch)
    assert helpers.max_diff_on_mask(ours, ref, batch.attention_mask) < helpers.ATOL
    assert helpers.max_diff_on_mask(ref, clean, batch.attention_mask) > 1e-2  # the ablation matters
    assert_no_hooks(model)


@pytest.mark.parametrize("hook_name", [
    "hook_embed", "hook_image_embeds", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid",
    "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
])
def test_standard_hook_names_fire_and_act(model, batch, clean_logits, hook_name):
    seen = []

    def record(x, hook):
        seen.append((hook.name, tuple(x.shape)))

    def perturb(x, hook):
        return x * 1.5 if "scores" not in hook.name else x * 0.5

    with torch.no_grad():
        same = model.run_with_hooks(batch, fwd_hooks=[(hook_name, record)])
        changed = model.run_with_hooks(batch, fwd_hooks=[(hook_name, perturb)])
    assert len(seen) == 1 and seen[0][0] == hook_name
    assert torch.equal(same, clean_logits)
    assert (changed - clean_logits).abs().max() > 1e-3, f"editing {hook_name} did not change the logits"
    assert_no_hooks(model)


def test_hooks_removed_after_exception_in_context(model, batch, clean_logits):
    class Boom(RuntimeError):
        pass

    def add(x, hook):
        return x + 1.0

    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", add), ("hook_image_embeds", add)]):
            assert model.hook_dict["blocks.0.hook_resid_pre"]._forward_hooks
            with torch.no_grad():
                model(batch)
            raise Boom()
    assert_no_hooks(model)

    def explode(x, hook):
        raise Boom("inside a hook")

    with pytest.raises(Boom, match="inside a hook"):
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_pattern", add), ("blocks.1.hook_mlp_out",
                                                                                          explode)])
    assert_no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(batch), clean_logits)


def test_hooks_apply_during_generate(model, batch):
    base = model.generate(batch, max_new_tokens=3)
    calls = []

    def kill_images(x, hook):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    def scramble(x, hook):
        calls.append(x.shape[1])
        return -x

    with model.hooks(fwd_hooks=[("hook_image_embeds", kill_images), ("blocks.0.hook_resid_pre", scramble)]):
        hooked = model.generate(batch, max_new_tokens=3)
    assert_no_hooks(model)
    assert len(calls) == 1 + 3  # image embeds once; resid_pre on the prompt and 2 cached steps
    assert not torch.equal(base, hooked)


# ------------------------------------------------------------------------------------------ partial forward
def test_stop_then_start_at_layer_equals_full(model, batch, clean_logits):
    with torch.no_grad():
        resid = model(batch, stop_at_layer=1)
        _, cache = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_pre")
        assert torch.equal(resid, cache["blocks.1.hook_resid_pre"])
        logits = model(resid, start_at_layer=1, attention_mask=batch.attention_mask)
        embedded = model(batch, stop_at_layer=0)
        from_embed = model(embedded, start_at_layer=0, attention_mask=batch.attention_mask)
    assert torch.allclose(logits, clean_logits, atol=1e-6)
    assert torch.allclose(from_embed, clean_logits, atol=1e-6)


def test_padding_does_not_change_a_prompts_logits(model, prompts, batch, clean_logits):
    for i in range(2):
        single = model.prepare([prompts[i]])
        with torch.no_grad():
            alone = model(single)
        n = single.seq_len
        assert torch.allclose(clean_logits[i, -n:], alone[0], atol=1e-4), i


@pytest.mark.parametrize("kwargs", [dict(fold_ln=True), dict(fold_ln=True, center_unembed=True)])
def test_weight_processing_keeps_log_probs(hf_model, tokenizer, batch, clean_logits, helpers, kwargs):
    folded = HookedMLLM.from_hf(hf_model, tokenizer, **kwargs)
    assert folded.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        lp = folded(batch).log_softmax(-1)
    ref = clean_logits.log_softmax(-1)
    assert helpers.max_diff_on_mask(lp, ref, batch.attention_mask) < helpers.ATOL
    # the HF model is untouched by folding (its decoder weights were copied)
    assert helpers.max_diff_on_mask(helpers.hf_logits(hf_model, batch), clean_logits, batch.attention_mask) < 1e-4


def test_loss_and_check_finite(model, batch):
    with torch.no_grad():
        loss = model(batch, return_type="loss")
    assert loss.dim() == 0 and torch.isfinite(loss)

    def nan(x, hook):
        return x * float("nan")

    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", nan)]):
        with pytest.raises(NumericalError, match="NaN/inf"):
            with torch.no_grad():
                model(batch, check_finite=True)
    assert_no_hooks(model)


def test_to_str_tokens_marks_images(model, batch):
    strs = model.to_str_tokens(batch, i=1)
    n = model.image_encoder.tokens_per_image
    assert len(strs) == int(batch.attention_mask[1].sum())
    assert [s for s in strs if s.startswith("<img_")] == [f"<img_{k}>" for k in range(n)]
    assert strs[0] == model.tokenizer.bos_token


# =================================================================================================== errors
def _save_config(hf_model, path):
    """config.json of the HF model, naming its class in ``architectures`` (as save_pretrained does)."""
    hf_model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = [type(hf_model).__name__]
    (path / "config.json").write_text(json.dumps(cfg))


def _write_config(path, architectures):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": architectures}))
    return path


def test_unknown_architecture_in_checkpoint(tmp_path):
    d = _write_config(tmp_path / "foo", ["FooForConditionalGeneration"])
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"'FooForConditionalGeneration' is not supported.*LlavaForConditionalGeneration"):
        HookedMLLM.from_pretrained(d)


def test_unknown_architecture_adapter_for():
    with pytest.raises(UnsupportedArchitectureError, match=r"'Foo' is not supported\. Supported architectures: \["):
        adapter_for("Foo")
    assert adapter_for("LlavaForConditionalGeneration").__name__ == "LlavaAdapter"


def test_unknown_architecture_from_hf(tokenizer):
    class FooForConditionalGeneration(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedArchitectureError, match="LlavaForConditionalGeneration"):
        HookedMLLM.from_hf(FooForConditionalGeneration(), tokenizer)


def test_unknown_decoder_type():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(UnsupportedArchitectureError,
                       match=r"'gpt2' is not supported.*\['gemma3_text', 'llama', 'mistral', 'qwen2'"):
        decoder_spec(Cfg())


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HookedMLLM.from_pretrained(tmp_path / "nowhere")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        HookedMLLM.from_pretrained(f)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="No config.json"):
        HookedMLLM.from_pretrained(tmp_path)


def test_config_without_architectures(tmp_path):
    d = _write_config(tmp_path / "m", [])
    with pytest.raises(CheckpointError, match="'architectures'"):
        HookedMLLM.from_pretrained(d)


def test_pickle_only_checkpoint_refused_then_allowed(tmp_path, hf_model, tokenizer, batch, clean_logits):
    _save_config(hf_model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        HookedMLLM.from_pretrained(tmp_path)
    loaded = HookedMLLM.from_pretrained(tmp_path, allow_pickle=True)
    with torch.no_grad():
        assert torch.allclose(loaded(batch), clean_logits, atol=1e-5)


def test_no_weights(tmp_path, hf_model):
    _save_config(hf_model, tmp_path)
    with pytest.raises(CheckpointError, match="No weights"):
        HookedMLLM.from_pretrained(tmp_path)


def test_no_tokenizer(tmp_path, hf_model):
    _save_config(hf_model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="No tokenizer files"):
        HookedMLLM.from_pretrained(tmp_path)


def test_placeholders_vs_images(model, images):
    with pytest.raises(ImageTokenMismatchError, match=r"1 '<image>' placeholder\(s\) but 0 image\(s\)"):
        model.prepare(["<image> hi"], images=[[]])
    with pytest.raises(ImageTokenMismatchError, match=r"1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        model.prepare(["<image> hi"], images=[images[:2]])
    with pytest.raises(ImageTokenMismatchError, match="2 prompts but 1 image lists"):
        model.prepare(["<image> hi", "<image> ho"], images=[[images[0]]])
    with pytest.raises(ImageTokenMismatchError, match=r"0 '<image>' placeholder\(s\) but 1 image\(s\)"):
        split_placeholders("no image here", [images[0]])


def test_image_features_of_wrong_length(model, batch):
    n = int(batch.spans.mask("image").sum())
    wrong = torch.zeros(n - 1, model.cfg.d_model)
    with pytest.raises(ImageTokenMismatchError, match=f"has {n} image tokens but the images gave {n - 1} features"):
        model(batch, image_features=wrong)
    # the right length is accepted and replaces the vision tower's output
    with torch.no_grad():
        feats = model.image_encoder.encode_images(**batch.model_inputs)
        assert torch.equal(model(batch, image_features=feats), model(batch))


def test_images_without_tokens_and_tokens_without_images(model, batch):
    text_only = model.prepare([[Segment("question", "What is the shape?")]])
    with pytest.raises(ImageTokenMismatchError, match="no image tokens"):
        model(text_only.tokens, pixel_values=batch.model_inputs["pixel_values"])
    with pytest.raises(ImageTokenMismatchError, match="no images were given"):
        model(batch.tokens, attention_mask=batch.attention_mask)


def test_bad_pixel_tensors(model, images):
    with pytest.raises(ImageTokenMismatchError, match=r"the vision tower expects \(3, 32, 32\)"):
        model.prepare([[Segment("image", image=torch.zeros(3, 16, 16)), Segment("question", "hi")]])
    with pytest.raises(ImageTokenMismatchError, match="either all as PIL images or all as pixel tensors"):
        model.prepare([[Segment("image", image=torch.zeros(3, 32, 32)), Segment("image", image=images[0])]])


def test_segment_errors_via_prepare(model, images):
    with pytest.raises(SpanError, match="Segment names must be non-empty"):
        model.prepare([[Segment("", "What is the shape?")]])
    with pytest.raises(ImageTokenMismatchError, match="contains the image placeholder '<image>'"):
        model.prepare([[Segment("image", image=images[0]), Segment("context", "see <image>")]])
    batch = model.prepare([[Segment("image", image=images[0]), Segment("question", "What is the shape?")]])
    with pytest.raises(SpanError, match=r"no token group 'context'\. Available groups: \['bos', "):
        batch.spans["context"]
    empty = model.prepare([[Segment("image", image=images[0]), Segment("context", ""),
                            Segment("question", "What?")]])
    with pytest.raises(SpanError, match=r"'context' is empty in sample\(s\) \[0\]"):
        empty.spans["context"]


def test_error_family():
    for cls in (CheckpointError, ImageTokenMismatchError, SpanError, UnsupportedArchitectureError, NumericalError):
        assert issubclass(cls, ModalityCircuitsError) and issubclass(cls, ValueError)
