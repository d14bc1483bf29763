"""ShapesWorld: the procedural world of the built-in model (renderer, caption grammar and
tokenizer), the built-in model itself, its pretraining, the perception model that judges
images, and simulated raters."""
