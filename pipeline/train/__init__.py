"""Training: objectives (pure torch), and later the DeepSpeed engine and the trainer."""
