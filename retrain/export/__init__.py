"""Export: the trained classifier as files clients load, and the check of each one.

`stage.export_run` is the stage: `writer` writes the frozen graph, labels, SavedModel (with
in-graph decoding, `graph_decode`) and TFLite model (labels inside, `tflite_labels`); `check`
loads each file back as a client would (`loading`, shared with label-image) and runs it on the
test photos."""
