"""ct-ai-node: a chest-CT AI node that sits beside a hospital PACS."""

__version__ = "0.1.0"
