"""The GPU benchmark script (benchmarks/gpu_paper_pipeline.py) runs end to end on the CPU with shrunk configs that
keep the real models' options (LLaVA-1.5's CLIP-L/336 layout, Qwen2.5-VL's windowed vision tower and M-RoPE) at
576 image tokens per image, and HookedMLLM's logits there equal HF eager's (fp32): what the script measures on a GPU
is the same computation. Timings are printed, never asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_script_on_tiny_configs(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_paper_pipeline as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "gpu.json"
    results = bench.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--n", "2", "--n-scan", "1",
                          "--repeats", "1", "--out", str(out)])
    assert [r["model"] for r in results] == ["llava", "qwen2.5-vl"]
    for r in results:
        assert r["image_tokens"] == 576, r["model"]
        assert r["max_abs_logit_diff_vs_eager"] < 1e-4, r["model"]
        assert r["knockout_configs"] == 4 * 9
        h = r["extrapolated_hours"]
        assert h["study_with_ablation"] >= h["knockout"] > 0
    assert json.loads(out.read_text())["results"][1]["model"] == "qwen2.5-vl"
