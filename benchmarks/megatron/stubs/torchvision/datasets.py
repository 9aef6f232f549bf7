from torchvision import __getattr__  # noqa: F401  (import-only stand-in)
