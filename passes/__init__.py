"""arc's passes: each module registers one pass named after it (kv_fusion.py is "kv-fusion")."""

from arc.passes import (  # noqa: F401
    kv_fusion,
    layer_skip,
    sparse_attention,
    spec_tree,
    weight_format,
)
