"""Hot-path kernels: fused SAE top-k encode, row-wise top-k, sparse WINA GEMV and int8 GEMMs."""

from featurelens.kernels.sae_encode import topk_encode

__all__ = ["topk_encode"]

# Sparse (WINA) GEMV for batch-1 decode: native C++/AVX2 on CPU with a torch fallback; Triton version in
# featurelens.kernels.triton_sparse (imported lazily: it needs triton).
# (The submodule is not shadowed by a re-exported function of the same name: `from featurelens.kernels import
# sparse_gemv` gives the module; call `sparse_gemv.sparse_gemv(...)`.)
from featurelens.kernels.sparse_gemv import transpose_weight  # noqa: E402

__all__ += ["transpose_weight"]
