"""Import-only stand-ins for Megatron-DeepSpeed on a CPU with DeepSpeed 0.19 (put on PYTHONPATH by run_megatron.py).

`deepspeed.compression.compress` is gone from DeepSpeed 0.19, but megatron/training.py imports it
unconditionally; it only calls it with compression enabled, which these runs never are.
"""
import sys
import types


def _refuse(*_args, **_kwargs):
    raise RuntimeError("deepspeed.compression.compress is a stand-in (removed in DeepSpeed 0.19)")


_compress = types.ModuleType("deepspeed.compression.compress")
_compress.init_compression = _compress.redundancy_clean = _refuse
sys.modules.setdefault("deepspeed.compression.compress", _compress)
