"""Figures for the analyses (plotly) and attention views (circuitsvis), all built from tidy tables.

:mod:`~modality_circuits.viz.figures`
    knockout curves (paper Figs 2-3), contribution bars, anchor read-out lines, head heatmaps and the
    blocking/amplification results table.
:mod:`~modality_circuits.viz.attention`
    circuitsvis attention views of chosen heads restricted to chosen token groups.
:mod:`~modality_circuits.viz.image_attention`
    attention from a query position to the image patches, drawn over the image grid next to the image.
:mod:`~modality_circuits.viz.export`
    optional PNG export (only where kaleido and a Chromium are present).
"""

from .attention import attention_heads_html, attention_view_props, circuitsvis_bundle, show_attention_heads
from .export import png_export_available, save_png
from .figures import (
    CONDITION_LABELS,
    anchor_lines,
    contribution_bars,
    failure_stage_lines,
    head_heatmaps,
    knockout_curves,
    path_effect_lines,
    results_table_html,
    stability_lines,
)
from .image_attention import ImageAttention, image_attention, image_attention_figure, image_attention_maps

__all__ = ["CONDITION_LABELS", "ImageAttention", "anchor_lines", "attention_heads_html", "attention_view_props",
           "circuitsvis_bundle", "contribution_bars", "failure_stage_lines", "head_heatmaps", "image_attention",
           "image_attention_figure",
           "image_attention_maps", "knockout_curves", "path_effect_lines", "png_export_available",
           "results_table_html", "save_png", "show_attention_heads", "stability_lines"]
