"""The transforms alexnet_model.py composes; they act on tensors (FakeData yields tensors)."""
import torch


class Compose:

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:

    def __call__(self, x):
        return torch.as_tensor(x, dtype=torch.float32)


class Normalize:

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x):
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


class Lambda:

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)
