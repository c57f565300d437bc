"""arc's passes: each module registers one pass named after it (kv_fusion.py is "kv-fusion")."""

from arc.passes import kv_fusion, layer_skip, spec_tree, weight_format  # noqa: F401
