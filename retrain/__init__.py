"""retrain: retrain an image classifier on a folder of class subfolders.

Data flows one way through the modules:

    scan (files, labels, split) -> decode (pixels) -> extract (module features)
    -> cache (sharded bottleneck store) -> train (new softmax head)
    -> evaluate -> export (frozen graph, labels, SavedModel)

`cli` wires them together behind retrain.py-compatible flags (`flags`).
"""

__version__ = "0.1.0"
