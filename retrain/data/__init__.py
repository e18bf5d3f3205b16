"""The data: which images there are, their labels and splits, and their pixels.

`stage.scan_images(config)` is the stage: class folders (`scan`), folders already split into
train/ val/ test/ (`layout`) or a CSV of labels (`labels_csv`) give an `ImageSet`. `decode`
reads a file into RGB pixels (Pillow), `preprocess` and `resize` make the module's input,
`sampling` decides which images a batch draws. Nothing here imports TensorFlow, so
label-image starts fast."""
