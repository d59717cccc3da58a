"""Read, normalize, fold, probe and infer shapes: a model and its data as spa needs them."""
