"""The bottlenecks: every image's feature vector from the pretrained module, cached.

`stage.compute_bottlenecks` is the stage: it looks every image up in the `cache`, computes
what is missing (`extract`: a tf.data pipeline over an extraction `backends`; `distort`ed
copies; a share of a cluster's work, `distribute`) and returns `Bottlenecks`, whose `splits`
read the vectors of each split. `beam` computes the same cache with Apache Beam."""
