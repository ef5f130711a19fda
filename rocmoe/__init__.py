"""rocmoe: MXFP4 MoE, DeepSeek sparse-MLA decode and Gemma 4 MoE routing on
AMD ROCm, NVIDIA CUDA, Intel XPU and CPU, behind one backend registry.

Importing rocmoe registers the ``rocmoe::*`` custom ops; it imports no
optional backend library (Triton, AITER) until an op needs one.
"""

from rocmoe.device import Device
from rocmoe.formats import dequantize_mxfp4, quantize_mxfp4
from rocmoe.ops.gemma4_routing import gemma4_routing
from rocmoe.ops.mxfp4_moe import Mxfp4MoeWeights, mxfp4_moe, mxfp4_moe_workspace_size
from rocmoe.ops.sparse_mla_decode import sparse_mla_decode
from rocmoe.ops.sparse_topk import sparse_topk
from rocmoe.registry import BackendUnavailableError

try:
    from rocmoe._version import __version__
except ImportError:  # a plain checkout that was never built or installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "Device",
    "BackendUnavailableError",
    "gemma4_routing",
    "mxfp4_moe",
    "mxfp4_moe_workspace_size",
    "Mxfp4MoeWeights",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "sparse_mla_decode",
    "sparse_topk",
]
