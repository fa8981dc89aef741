"""Making ingredients: contrastive pre-training, fine-tuning, the sweep's random search, augmentation."""
