"""What the pipeline is made of and every upper layer reads: the params sections, ingredients (checkpoints with
their sidecars), the data splits, the open_clip models and where external checkpoints come from."""
