"""Import-only stand-in for torchvision (no CPU build here): megatron/training.py imports Megatron's vision
datasets, which import torchvision; GPT pretraining never builds them. Every name is a class that refuses use."""


class Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is an import-only stand-in here")


def __getattr__(name):
    return Unavailable
