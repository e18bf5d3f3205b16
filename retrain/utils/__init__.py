"""Small process-level utilities every layer may use: crash-safe writes and storage errors
(`atomic`), Ctrl-C at safe points (`interrupt`), the TensorFlow import, CPUs and freed memory
(`runtime`), module handles and URLs (`handles`), a cluster from $TF_CONFIG (`tf_config`)."""
