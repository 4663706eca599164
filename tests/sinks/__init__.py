"""Where summaries go besides the run log (W&B, TensorBoard, MLflow, trackio), read back from each store."""
