"""Stage 4, training: Ray Train ``TorchTrainer`` workers running DeepSpeed ZeRO-2/3 over the
packed multimodal token streams (``run.run_train``)."""
