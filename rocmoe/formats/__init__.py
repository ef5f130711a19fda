"""Packed number formats: MXFP4 now, FP8 cache entries later."""

from rocmoe.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = ["dequantize_mxfp4", "quantize_mxfp4"]
