"""The one glossary of tensor dimension names used in jaxtyping annotations across the package.

======== ==========================================================================
name     meaning
======== ==========================================================================
batch    prompts in a batch (left-padded to a common length)
pos      token positions in the padded sequence (image tokens expanded)
q_pos    query positions of an attention pattern (same axis as ``pos``)
k_pos    key positions of an attention pattern
d_model  residual stream width of the language model
n_heads  attention heads of a layer (``head`` when indexing one)
d_head   width of one head's query/key/value/z
layer    decoder layers
vocab    vocabulary entries (``d_vocab``)
group    named token groups (image, context, instruction, constraint, question, system, last, ...)
img_tok  image-token positions, flattened over all images of a batch in order of appearance
img_pos  image-token positions of one image
grid_h   rows of an image's patch grid
grid_w   columns of an image's patch grid
channel  image colour channels
height   image height in pixels
width    image width in pixels
config   intervention configurations run side by side in one batched forward
sample   samples of a dataset
======== ==========================================================================
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int  # re-exported for annotations

__all__ = ["Bool", "Float", "Int"]
