"""label-image: classify images with a graph exported by retrain."""
