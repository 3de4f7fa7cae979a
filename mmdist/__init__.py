"""mmdist: dataset distillation with minimax-fine-tuned diffusion models, on Ray."""
