"""Import-only stand-in for torchvision (no CPU build of it is installed here).

DeepSpeed's tests/unit/alexnet_model.py (TestPipeCifar10) asks for
torchvision>=0.5 only for datasets.FakeData and four transforms. Both engines
in a suite run see the same data, so the images need not match torchvision's.
"""
from . import datasets, transforms  # noqa: F401

__version__ = "0.5.0+dpe.stub"
