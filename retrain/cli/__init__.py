"""The command lines, thin over the library: `retrain` (`retrain.py`), its flags (one table,
`flag_table`, defined by `flags`) and `retrain-beam-extract` (`beam_extract`)."""
