"""quantseal: compress a checkpoint to a memory budget, export one watermarked ONNX model
per customer, and verify ownership black-box.  See DESIGN.md for the map."""

__version__ = "0.1.0"
