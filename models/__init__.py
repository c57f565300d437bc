"""Model families and the catalog. A family maps HF model types to IR-emitting forwards."""

from arc.models import llama

# HF model_type -> family module
FAMILIES = {t: llama for t in llama.MODEL_TYPES}
