"""``reproduce`` runs every stage end to end on tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL, tiled (InternVL, LLaVA-NeXT /
OneVision, SmolVLM) and Gemma 3 checkpoints (the LLaVA path is covered by test_cli.py), and the attention-over-image
view follows each architecture's own patch grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modality_circuits import HookedMLLM, Segment, cli
from modality_circuits.data import synthetic
from modality_circuits.testing import (
    DEFAULT_CORPUS,
    random_images,
    tiny_bpe_tokenizer,
    tiny_gemma3,
    tiny_gemma3_tokenizer,
    tiny_idefics3,
    tiny_idefics3_tokenizer,
    tiny_internvl,
    tiny_internvl_tokenizer,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen_tokenizer,
    tiny_qwen_vl,
)

TINY_RUN = ["--n", "8", "--n-general", "2", "--n-failed-pool", "6", "--n-random", "2", "--alphas", "2,4",
            "--heatmap-methods", "ablation,dla,attention", "--batch-size", "8", "--threads", "1", "--no-png", "--quiet"]


def _processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})


def _corpus() -> list[str]:
    texts = [DEFAULT_CORPUS]
    for kind in ("conflict", "consistent", "image_probe", "text_probe"):
        for s in synthetic(100, seed=0, kind=kind):
            texts += [seg.text for seg in s.segments() if not seg.is_image] + [s.answer_img, s.answer_text]
    return texts


def write_tiny_qwen(path: Path, version: str) -> Path:
    """A tiny random Qwen-VL checkpoint whose tokenizer covers the synthetic data's words."""
    tok = tiny_qwen_tokenizer(_corpus(), vocab_size=800)
    tiny_qwen_vl(tok, version=version).save_pretrained(path)
    tok.save_pretrained(path)
    _processor().save_pretrained(path)
    return path


@pytest.mark.parametrize("version", ["2", "2.5", "3"])
def test_reproduce_end_to_end_on_qwen_vl(tmp_path, version):
    ckpt = write_tiny_qwen(tmp_path / "ckpt", version)
    out = tmp_path / "run"
    assert cli.main(["reproduce", "--model", str(ckpt), "--out", str(out), *TINY_RUN]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"].startswith("Qwen2" if version != "3" else "Qwen3VL")
    assert {"knockout", "contributions", "anchors", "heads", "patching"} <= set(manifest["results"])
    maps = json.loads((out / "image_attention.json").read_text())
    maps = maps if isinstance(maps, list) else maps.get("maps", [])
    assert maps and all(np.asarray(m["grid"]).ndim == 2 for m in maps)
    assert (out / "report.html").stat().st_size > 10_000


def write_tiny_tiled(path: Path, arch: str) -> Path:
    """A tiny random InternVL, LLaVA-NeXT, LLaVA-OneVision, SmolVLM or Gemma 3 checkpoint (Pil processor; the tokenizer
    covers the synthetic data)."""
    if arch == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tok = tiny_gemma3_tokenizer(_corpus(), vocab_size=800)
        hf = tiny_gemma3(tok)
        proc = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    elif arch == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tok = tiny_internvl_tokenizer(_corpus(), vocab_size=800)
        hf = tiny_internvl(tok)
        proc = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=12)
    elif arch == "smolvlm":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tok = tiny_idefics3_tokenizer(_corpus(), vocab_size=800)
        hf = tiny_idefics3(tok, smolvlm=True)
        proc = Idefics3ImageProcessorPil(do_image_splitting=True, max_image_size={"longest_edge": 32},
                                         size={"longest_edge": 64})
    elif arch == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        tok = tiny_bpe_tokenizer(_corpus(), vocab_size=800)
        hf = tiny_llava_onevision(tok)
        proc = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                               image_grid_pinpoints=hf.config.image_grid_pinpoints)
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        tok = tiny_bpe_tokenizer(_corpus(), vocab_size=800)
        hf = tiny_llava_next(tok)
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                          image_grid_pinpoints=hf.config.image_grid_pinpoints)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch,adapter,grid", [("internvl", "InternVLAdapter", (4, 4)),
                                               ("llava_next", "LlavaNextAdapter", (4, 4)),
                                               ("llava_onevision", "LlavaOnevisionAdapter", (4, 4)),
                                               ("smolvlm", "Idefics3Adapter", (4, 4)),
                                               ("gemma3", "Gemma3Adapter", (4, 4))])
def test_reproduce_end_to_end_on_tiled_architectures(tmp_path, arch, adapter, grid):
    ckpt = write_tiny_tiled(tmp_path / "ckpt", arch)
    model = HookedMLLM.from_pretrained(ckpt)
    assert type(model.image_encoder).__name__ == adapter
    assert type(model.image_encoder.image_processor).__name__.endswith("Pil")
    out = tmp_path / "run"
    assert cli.main(["reproduce", "--model", str(ckpt), "--out", str(out), *TINY_RUN]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == {"internvl": "InternVLForConditionalGeneration",
                                                 "llava_next": "LlavaNextForConditionalGeneration",
                                                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                                                 "smolvlm": "SmolVLMForConditionalGeneration",
                                                 "gemma3": "Gemma3ForConditionalGeneration"}[arch]
    assert {"knockout", "contributions", "anchors", "heads", "patching"} <= set(manifest["results"])
    maps = json.loads((out / "image_attention.json").read_text())
    assert maps and all(np.asarray(m["grid"]).shape == grid for m in maps)  # one tile / the base tile: 4 x 4
    assert (out / "report.html").stat().st_size > 10_000


def test_qwen_image_pixels_undo_the_patch_flattening():
    tok = tiny_qwen_tokenizer()
    model = HookedMLLM.from_hf(tiny_qwen_vl(tok), tok, _processor())
    im = random_images(1, 32, seed=5)[0].resize((24, 32))
    batch = model.prepare([[Segment("image", image=im), Segment("question", "What?")]])
    grid = model.image_encoder.image_grid(batch.model_inputs, 0)
    pixels = model.image_encoder.image_pixels(batch.model_inputs, 0)
    t, h, w = batch.model_inputs["image_grid_thw"][0].tolist()
    assert (grid.rows, grid.cols) == (h // 2, w // 2) and grid.n_tokens == batch.spans.counts()["image.0"][0]
    assert pixels.shape == (h * 4, w * 4, 3)
    ref = np.asarray(im.resize((w * 4, h * 4)), dtype=float)  # the processor resizes to whole patches
    assert np.corrcoef(ref.ravel(), pixels.astype(float).ravel())[0, 1] > 0.9
