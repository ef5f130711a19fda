"""One module per op: validation, the public function, the ``rocmoe::<op>``
custom op and its fake implementation. Importing this registers the ops.

The public functions are re-exported by :mod:`rocmoe`; here each name is the
op's module (``rocmoe.ops.mxfp4_moe`` is the module, ``rocmoe.mxfp4_moe`` the function).
"""

from rocmoe.ops import gemma4_routing, mxfp4_moe, sparse_mla_decode, sparse_topk

__all__ = ["gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk"]
