"""Training infrastructure shared by pretraining and fine-tuning: config schema, DeepSpeed engine set-up,
optimizer groups and schedules, checkpoints, tracking and the step loop."""
